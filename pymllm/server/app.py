"""The FastAPI app of the HTTP process: OpenAI-compatible, native and admin routes."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from pymllm.configs.server_config import ServerConfig
from pymllm.engine.io_struct import GenerateReqInput
from pymllm.server.auth import ApiKeyMiddleware
from pymllm.server.engine_protocol import EngineClient, EngineDeadError
from pymllm.server.engine_requests import new_request_id
from pymllm.server.errors import OpenAIError, bad_request, install_error_handlers
from pymllm.server.generation import ClientDisconnected
from pymllm.server.metrics import CONTENT_TYPE, RequestCountMiddleware
from pymllm.server.protocol import (
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    ModelCard,
    ModelList,
)
from pymllm.server.reply_fields import json_response
from pymllm.server.serving_chat import create_chat_completion
from pymllm.server.serving_completions import create_completion
from pymllm.server.serving_native import generate
from pymllm.server.serving_tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize
from pymllm.server.state import ServerState

logger = logging.getLogger(__name__)

_HEALTH_GENERATE_TIMEOUT_S = 20.0
# nginx's code for "client closed request": nobody reads it, but logs show what happened.
_CLIENT_CLOSED_STATUS = 499


def create_app(client: EngineClient, server_config: ServerConfig) -> FastAPI:
    state = ServerState(client=client, config=server_config)
    app = FastAPI(title="pymllm", docs_url="/docs", redoc_url=None)
    app.state.pymllm = state
    install_error_handlers(app)

    async def on_disconnect(_: Request, __: Exception) -> Response:
        return Response(status_code=_CLIENT_CLOSED_STATUS)

    async def on_engine_dead(_: Request, exc: Exception) -> Response:
        # Admin routes (server_info, flush_cache) reach the engine through control().
        return OpenAIError(503, str(exc) or "the engine is not running", code="engine_dead").to_response()

    app.add_exception_handler(ClientDisconnected, on_disconnect)
    app.add_exception_handler(EngineDeadError, on_engine_dead)
    _add_openai_routes(app, state)
    _add_admin_routes(app, state)
    if server_config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server_config.api_key)
    # Added last, so outermost: it also counts the 401s of the key check.
    app.add_middleware(RequestCountMiddleware, metrics=state.metrics)
    return app


def _model_card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=state.created, max_model_len=state.client.context_length)


def _add_openai_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def list_models() -> Response:
        return json_response(ModelList(data=[_model_card(state)]))

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> Response:
        state.check_model(model_id)
        return json_response(_model_card(state))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(state, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(state, body, request)

    @app.post("/generate")
    async def native_generate(body: GenerateRequest, request: Request) -> Response:
        return await generate(state, body, request)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> Response:
        return await tokenize(state, body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> Response:
        return await detokenize(state, body)


def _add_admin_routes(app: FastAPI, state: ServerState) -> None:
    client = state.client

    @app.get("/health")
    async def health() -> Response:
        if client.is_healthy():
            return JSONResponse({})
        raise OpenAIError(503, "an engine process has died", code="engine_dead")

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if not client.is_healthy():
            raise OpenAIError(503, "an engine process has died", code="engine_dead")
        error = await _probe_generation(client)
        if error is not None:
            raise OpenAIError(503, f"health generation failed: {error}", code="unhealthy")
        return JSONResponse({})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await state.metrics.render(client.control), media_type=CONTENT_TYPE)

    @app.get("/server_info")
    async def server_info() -> Response:
        resp = await client.control("server_info")
        if not resp.ok:
            raise OpenAIError(500, resp.payload.get("message", "server_info failed"))
        return JSONResponse(resp.payload)

    @app.post("/abort_request")
    async def abort_request(body: AbortRequest) -> Response:
        # An API id stands for all its choices' engine requests.
        for rid in state.active.get(body.rid, [body.rid]):
            await client.abort(rid)
        return JSONResponse({"success": True})

    @app.post("/flush_cache")
    async def flush_cache() -> Response:
        resp = await client.control("flush_cache")
        message = resp.payload.get("message", "cache flushed" if resp.ok else "cache flush failed")
        if not resp.ok:
            raise bad_request(message)
        return JSONResponse({"success": True, "message": message})


async def _probe_generation(client: EngineClient) -> "str | None":
    """Run a one-token generation through the whole pipeline; the error text, or None."""
    rid = new_request_id("health")
    req = GenerateReqInput(rid=rid, text="ping", sampling_params={"max_new_tokens": 1, "temperature": 0.0})

    async def run() -> "str | None":
        async for out in client.generate(req):
            if out.finished:
                reason = out.finish_reason
                if reason is not None and reason.status_code is not None:
                    return reason.message or "rejected"
                return None
        return "the engine ended the request early"

    try:
        return await asyncio.wait_for(run(), _HEALTH_GENERATE_TIMEOUT_S)
    except asyncio.TimeoutError:
        await client.abort(rid)
        return f"no token within {_HEALTH_GENERATE_TIMEOUT_S:.0f}s"
    except Exception as exc:
        return repr(exc)

"""/tokenize and /detokenize, in vLLM's shapes: the token ids the engine would see for a prompt or
a chat (its template applied exactly as the tokenizer process applies it), and text back from ids.
Clients use them to count tokens against the context before they send a request."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from pydantic import BaseModel, Field, model_validator
from starlette.responses import Response

from pymllm.engine.io_struct import GenerateReqInput, RequestRefused
from pymllm.orchestrator.tokenizer_process import RequestTokenizer
from pymllm.server.engine_requests import normalise_messages
from pymllm.server.errors import bad_request
from pymllm.server.protocol import RESERVED_TEMPLATE_KWARGS, ChatMessage, ChatTool
from pymllm.server.reply_fields import json_response
from pymllm.server.state import ServerState


class TokenizeRequest(BaseModel):
    """A prompt (``prompt``) or a chat (``messages``, rendered by the model's chat template)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[List[ChatMessage]] = Field(None, min_length=1)
    tools: Optional[List[ChatTool]] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    # A prompt's BOS and the like, as /v1/completions adds them; a chat's come from its template.
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.prompt is not None and (self.tools or self.chat_template_kwargs):
            raise ValueError("tools and chat_template_kwargs go with messages")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(self.chat_template_kwargs or {}))
        if reserved:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: List[int]
    token_strs: Optional[List[str]] = None  # with return_token_strs


class DetokenizeRequest(BaseModel):
    model: Optional[str] = None
    tokens: List[int]


class DetokenizeResponse(BaseModel):
    prompt: str


def _request_tokenizer(state: ServerState) -> RequestTokenizer:
    """The tokenizer process's own request handling over the server's tokenizer, so /tokenize and
    /detokenize render and check as a request would be (sampling defaults play no part here)."""
    return RequestTokenizer(state.client.tokenizer, state.client.context_length, {})


async def tokenize(state: ServerState, body: TokenizeRequest) -> Response:
    state.check_model(body.model)
    client = state.client
    worker = _request_tokenizer(state)
    try:
        if body.prompt is not None:
            ids = client.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            messages = normalise_messages(body.messages)
            if any(isinstance(m["content"], list) for m in messages):
                raise bad_request("/tokenize counts text; the tokens of images depend on the image", "messages")
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            ids = worker.prompt_ids(GenerateReqInput(
                rid="tokenize", messages=messages, tools=tools, chat_template_kwargs=body.chat_template_kwargs,
                add_generation_prompt=body.add_generation_prompt))
    except RequestRefused as exc:
        raise bad_request(str(exc)) from None
    ids = [int(t) for t in ids]
    strs = client.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return json_response(TokenizeResponse(count=len(ids), max_model_len=client.context_length, tokens=ids,
                                          token_strs=strs))


async def detokenize(state: ServerState, body: DetokenizeRequest) -> Response:
    state.check_model(body.model)
    try:
        _request_tokenizer(state).check_vocab(body.tokens, "tokens")
    except RequestRefused as exc:
        raise bad_request(str(exc), "tokens") from None
    return json_response(DetokenizeResponse(prompt=state.client.tokenizer.decode(body.tokens)))

"""Native /generate: text or token ids in, text plus token ids and counts out.

Sampling params use SamplingParams' own names (max_new_tokens, ...). Streamed events carry
the text and ids produced since the previous event (deltas), with cumulative counts.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pymllm.engine.io_struct import FinishReason, GenerateReqInput, RequestOutput
from pymllm.server.engine_requests import check_token_ids, new_request_id, validated_sampling
from pymllm.server.errors import bad_request
from pymllm.server.generation import ChoiceResult, SubRequestGroup, run_to_completion
from pymllm.server.logprobs import finite_logprob
from pymllm.server.protocol import GenerateRequest
from pymllm.server.sse import SSEResponse, event_stream, first_chunk, sse
from pymllm.server.state import ServerState


def _meta_info(rid: str, counts: Any, reason: Optional[FinishReason]) -> Dict[str, Any]:
    return {
        "id": rid,
        "prompt_tokens": counts.prompt_tokens,
        "completion_tokens": counts.completion_tokens,
        "cached_tokens": counts.cached_tokens,
        "finish_reason": reason.to_dict() if reason is not None else None,
    }


def _logprobs_json(entries: Optional[list]) -> List[list]:
    # A scored prompt's first token has no logprob (null).
    return [
        [token, None if lp is None else finite_logprob(lp), [[t, finite_logprob(tlp)] for t, tlp in top]]
        for token, lp, top in entries or []
    ]


async def generate(state: ServerState, body: GenerateRequest, request: Request) -> Response:
    params = validated_sampling(dict(body.sampling_params))
    if body.input_ids is not None:
        check_token_ids(body.input_ids, state.vocab_size, "input_ids")
    rid = body.rid or new_request_id("gen")
    if rid in state.active:
        raise bad_request(f"request id {rid!r} is already running", "rid")
    req = GenerateReqInput(
        rid=rid, text=body.text, input_ids=body.input_ids, sampling_params=params, stream=body.stream
    )
    wants_logprobs = bool(params.get("logprobs"))
    scores_prompt = bool(params.get("prompt_logprobs"))
    group = SubRequestGroup(state, rid, [req]).start()

    if body.stream:
        def render(_: int, out: RequestOutput) -> Iterable[str]:
            event: Dict[str, Any] = {
                "text": out.text,
                "output_ids": out.token_ids,
                "meta_info": _meta_info(rid, out, out.finish_reason if out.finished else None),
            }
            if wants_logprobs:
                event["meta_info"]["output_token_logprobs"] = _logprobs_json(out.logprobs)
            if scores_prompt and out.prompt_logprobs is not None:
                event["meta_info"]["input_token_logprobs"] = _logprobs_json(out.prompt_logprobs)
            return [sse(event)]

        first = await first_chunk(request, group)
        return SSEResponse(event_stream(request, group, first, [], render, lambda: []), group)

    result: ChoiceResult = (await run_to_completion(request, group))[0]
    reply: Dict[str, Any] = {
        "text": result.text,
        "output_ids": result.token_ids,
        "meta_info": _meta_info(rid, result, result.finish_reason),
    }
    if wants_logprobs:
        reply["meta_info"]["output_token_logprobs"] = _logprobs_json(result.logprobs)
    if scores_prompt:
        reply["meta_info"]["input_token_logprobs"] = _logprobs_json(result.prompt_logprobs)
    return JSONResponse(reply)

"""Turning validated API bodies into engine inputs: sampling params, messages, fan-out."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

from pymllm.engine.io_struct import GenerateReqInput
from pymllm.sampling_params import SamplingParams
from pymllm.server.errors import bad_request
from pymllm.server.protocol import ChatMessage, SamplingRequestFields


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def validated_sampling(params: Dict[str, Any]) -> Dict[str, Any]:
    """Check a sampling dict the way the engine will, so errors are a 400 here."""
    try:
        SamplingParams.from_dict(params)
    except (TypeError, ValueError) as exc:
        raise bad_request(str(exc)) from None
    return params


def openai_sampling(
    req: SamplingRequestFields,
    max_new_tokens: Optional[int],
    logprobs: bool,
    top_logprobs: int,
    constraint: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Sampling dict (SamplingParams field names) of an OpenAI request; unset values are left
    out so the model's generation_config defaults apply. ``constraint``: the grammar
    (structural_tag) the endpoint decodes under, instead of the request's own constraint
    (response_format, regex, ebnf or structured_outputs)."""
    params: Dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "seed": req.seed,
        "stop": [req.stop] if isinstance(req.stop, str) else req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "logit_bias": req.logit_bias,
    }
    params = {k: v for k, v in params.items() if v is not None}
    try:
        params.update(constraint or req.grammar_constraint())
    except ValueError as exc:  # a choice list that makes no grammar
        raise bad_request(str(exc), "structured_outputs") from None
    if logprobs:
        params["logprobs"] = True
        params["top_logprobs"] = top_logprobs
    return validated_sampling(params)


def fan_out(
    rid: str,
    n: int,
    sampling: Dict[str, Any],
    make: Callable[[str, Dict[str, Any], int], GenerateReqInput],
    num_prompts: int = 1,
) -> List[GenerateReqInput]:
    """One engine request per (prompt, choice), ordered prompt-major; ``make(rid, params,
    prompt_index)`` builds each. Seeded requests get seed + i for choice i, so the n choices
    differ yet stay reproducible. A single request keeps ``rid`` itself."""
    if n * num_prompts == 1:
        return [make(rid, sampling, 0)]
    reqs = []
    for prompt_index in range(num_prompts):
        for i in range(n):
            params = dict(sampling)
            if params.get("seed") is not None:
                params["seed"] = params["seed"] + i
            reqs.append(make(f"{rid}-{prompt_index * n + i}", params, prompt_index))
    return reqs


def normalise_messages(messages: Sequence[ChatMessage]) -> List[Dict[str, Any]]:
    """Messages as chat templates expect them: text parts joined into one string."""
    out = []
    for msg in messages:
        item: Dict[str, Any] = {
            # Few templates know "developer"; OpenAI treats it as the system role.
            "role": "system" if msg.role == "developer" else msg.role,
            "content": _normalise_content(msg.content),
        }
        if msg.name is not None:
            item["name"] = msg.name
        if msg.tool_calls:
            item["tool_calls"] = [call.model_dump(exclude_none=True) for call in msg.tool_calls]
        if msg.tool_call_id is not None:
            item["tool_call_id"] = msg.tool_call_id
        if msg.reasoning_content is not None:
            item["reasoning_content"] = msg.reasoning_content
        out.append(item)
    return out


def _normalise_content(content: Any) -> Any:
    if content is None or isinstance(content, str):
        return content
    if all(part.type == "text" for part in content):
        return "".join(part.text for part in content)
    # Image parts stay structured for multimodal templates.
    return [part.model_dump(exclude_none=True) for part in content]


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> None:
    """Out-of-vocabulary ids would index past the embedding table in a worker process."""
    for token in ids:
        if not 0 <= token < vocab_size:
            raise bad_request(f"token id {token} is outside the vocabulary [0, {vocab_size})", param)

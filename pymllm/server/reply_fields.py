"""What chat and completion replies share: usage, finish_reason, JSON encoding."""

from __future__ import annotations

from typing import List, Optional

from pydantic import BaseModel
from starlette.responses import Response

from pymllm.engine.io_struct import FinishReason
from pymllm.server.generation import ChoiceResult, usage_counts
from pymllm.server.protocol import PromptTokensDetails, UsageInfo


def usage_info(results: List[ChoiceResult], n: int) -> UsageInfo:
    prompt, completion, cached = usage_counts(results, n)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def finish_reason(reason: Optional[FinishReason], made_tool_calls: bool = False) -> str:
    """OpenAI's finish_reason. "abort" is not an OpenAI value, but clients accept any string
    and it tells an aborted request apart from a normal stop."""
    kind = reason.type if reason is not None else "stop"
    if made_tool_calls and kind != "abort":
        return "tool_calls"
    return kind


def json_response(body: BaseModel, status_code: int = 200) -> Response:
    # Serialised by pydantic directly: the models drop their omitted-if-None fields.
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json")

"""Typed messages exchanged between the frontend, tokenizer, scheduler and detokenizer.

Token ids travel between processes; text is produced once, in the detokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from pymllm.sampling_params import SamplingParams


@dataclass
class GenerateReqInput:
    """Frontend -> tokenizer. Exactly one of text, input_ids or messages is set."""

    rid: str
    text: Optional[str] = None
    input_ids: Optional[List[int]] = None
    messages: Optional[List[Dict[str, Any]]] = None  # chat: the tokenizer applies the template
    tools: Optional[List[Dict[str, Any]]] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    add_generation_prompt: bool = True
    sampling_params: Dict[str, Any] = field(default_factory=dict)
    stream: bool = False


@dataclass
class TokenizedGenerateReq:
    """Tokenizer -> scheduler."""

    rid: str
    input_ids: List[int]
    sampling_params: SamplingParams
    stream: bool = False
    # Images of a multimodal request (pymllm.multimodal.MultimodalInputs: numpy arrays, pickled).
    mm_inputs: Optional[Any] = None


@dataclass
class AbortReq:
    """Frontend -> tokenizer -> scheduler: stop a request and free its KV slots."""

    rid: str


# OpenAI's error code for a request that does not fit the context (clients act on it).
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


@dataclass
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: Any = None  # stop token id or stop string
    message: Optional[str] = None
    status_code: Optional[int] = None  # set when the request was rejected (e.g. 400)
    error_code: Optional[str] = None  # OpenAI's machine-readable code of a rejection, where one exists

    def to_dict(self) -> dict:
        return {"type": self.type, "matched": self.matched, "message": self.message}


class RequestRefused(ValueError):
    """A request refused with a 400 before it runs (by the tokenizer process or the scheduler);
    ``code`` is OpenAI's error code where clients act on one (``CONTEXT_LENGTH_EXCEEDED``)."""

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code

    def finish_reason(self) -> FinishReason:
        """The refused request's finish reason, which the server turns into its error response."""
        return FinishReason("abort", message=str(self), status_code=400, error_code=self.code)


# One position's logprob entry: (token id, logprob, [(top token id, top logprob), ...])
TokenLogprob = Tuple[int, float, List[Tuple[int, float]]]
# The same for a prompt token; the first prompt token's logprob is None.
PromptLogprob = Tuple[int, Optional[float], List[Tuple[int, float]]]


@dataclass
class BatchTokenIDOut:
    """Scheduler -> detokenizer: what each request produced since its last message."""

    rids: List[str]
    new_token_ids: List[List[int]]
    finished_reasons: List[Optional[FinishReason]]
    prompt_tokens: List[int]
    completion_tokens: List[int]
    cached_tokens: List[int]
    logprobs: List[Optional[List[TokenLogprob]]]
    skip_special_tokens: List[bool]
    stop_strings: List[List[str]]
    # Last few prompt ids on a request's first report: decoding context for its first word.
    prompt_tails: List[Optional[List[int]]] = field(default_factory=list)
    # Per request, once, when its prompt is scored (SamplingParams.prompt_logprobs): an entry
    # per prompt token, the first with logprob None (nothing comes before it).
    prompt_logprobs: List[Optional[List[PromptLogprob]]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """Detokenizer (or tokenizer, on rejection) -> frontend: one chunk of one request."""

    rid: str
    text: str  # new text since the previous chunk
    token_ids: List[int]  # new token ids since the previous chunk
    finished: bool
    finish_reason: Optional[FinishReason]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Per new token: (token text, logprob, [(top token text, top logprob), ...])
    logprobs: Optional[List[Tuple[str, float, List[Tuple[str, float]]]]] = None
    # Per prompt token, in the first chunk of a request that asked (logprob None for the first)
    prompt_logprobs: Optional[List[Tuple[str, Optional[float], List[Tuple[str, float]]]]] = None


@dataclass
class BatchRequestOutput:
    outputs: List[RequestOutput]


@dataclass
class ControlReq:
    """Frontend -> scheduler (through the tokenizer): server_info, flush_cache, ..."""

    kind: str
    request_id: str
    payload: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ControlResp:
    request_id: str
    ok: bool
    payload: Dict[str, Any] = field(default_factory=dict)

"""A scripted EngineClient and a byte-level tokenizer, for testing the HTTP layer without a
model (and for running the server's API surface by hand)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple, Union

import httpx

from pymllm.engine.io_struct import ControlResp, FinishReason, GenerateReqInput, RequestOutput
from pymllm.orchestrator.incremental_detokenizer import IncrementalDetokenizer
from pymllm.server.engine_protocol import EngineDeadError, QueueFullError


class ByteTokenizer:
    """Token id = one UTF-8 byte, so multi-byte characters always span several tokens, as
    in byte-level BPE vocabularies. Its chat template renders ChatML; ``think_prompt``
    makes the generation prompt open a ``<think>`` block (Qwen3 thinking templates)."""

    chat_template = "ChatML"  # has one (the tokenizer process checks); rendered by apply_chat_template

    def __init__(self, think_prompt: bool = False) -> None:
        self.think_prompt = think_prompt
        self.eos_token_id = 0

    def __len__(self) -> int:
        return 256

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> List[str]:
        return [bytes([i]).decode("latin-1") for i in ids]

    def apply_chat_template(
        self, messages: List[Dict[str, Any]], add_generation_prompt: bool = True, tokenize: bool = False,
        enable_thinking: bool = True, **_: Any,
    ) -> Union[str, List[int]]:
        text = "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
            if self.think_prompt:
                text += "<think>\n" if enable_thinking else "<think>\n\n</think>\n\n"
        return self.encode(text) if tokenize else text


@dataclass
class ScriptedReply:
    """What the fake engine does with one request.

    ``chunks``: text deltas, one token each. ``token_ids``: instead, ids run through the real
    IncrementalDetokenizer (with the request's stop strings), one chunk per id.
    """

    chunks: List[str] = field(default_factory=list)
    token_ids: Optional[List[int]] = None
    finish: str = "stop"
    reject: Optional[Tuple[int, str]] = None  # (HTTP status, message)
    queue_full: bool = False
    delay_s: float = 0.0
    prompt_tokens: int = 7
    cached_tokens: int = 3


Script = Callable[[GenerateReqInput], ScriptedReply]


class FakeEngineClient:
    def __init__(
        self,
        script: Union[ScriptedReply, Script, None] = None,
        tokenizer: Any = None,
        model_name: str = "fake-model",
        context_length: int = 4096,
    ) -> None:
        if script is None:
            script = ScriptedReply(chunks=["Hello", " world"])
        self._script: Script = script if callable(script) else (lambda _req, reply=script: reply)
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.model_name = model_name
        self.context_length = context_length
        self.healthy = True
        self.requests: List[GenerateReqInput] = []
        self.aborted: List[str] = []
        self.control_calls: List[str] = []
        self.server_info: Dict[str, Any] = {
            "config": {}, "running": 2, "queued": 1, "kv_used": 96, "kv_evictable": 32, "kv_total": 256,
        }
        self.flush_ok = True

    def is_healthy(self) -> bool:
        return self.healthy

    async def abort(self, rid: str) -> None:
        self.aborted.append(rid)

    async def control(self, kind: str, payload: Optional[Dict[str, Any]] = None) -> ControlResp:
        self.control_calls.append(kind)
        if not self.healthy:
            raise EngineDeadError("a worker process died")
        if kind == "server_info":
            return ControlResp(request_id=kind, ok=True, payload=dict(self.server_info))
        if kind == "flush_cache":
            message = "cache flushed" if self.flush_ok else "requests are running"
            return ControlResp(request_id=kind, ok=self.flush_ok, payload={"message": message})
        return ControlResp(request_id=kind, ok=False, payload={"message": f"unknown control {kind}"})

    async def generate(self, req: GenerateReqInput) -> AsyncIterator[RequestOutput]:
        if not self.healthy:
            raise EngineDeadError("a worker process died")
        self.requests.append(req)
        reply = self._script(req)
        if reply.queue_full:
            raise QueueFullError("queue is full")
        if reply.reject is not None:
            status, message = reply.reject
            reason = FinishReason("abort", message=message, status_code=status)
            yield RequestOutput(rid=req.rid, text="", token_ids=[], finished=True, finish_reason=reason)
            return
        steps = self._steps(req, reply)
        top_k = int(req.sampling_params.get("top_logprobs", 0))
        want_logprobs = bool(req.sampling_params.get("logprobs"))
        for i, (text, ids, stop) in enumerate(steps):
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            if req.rid in self.aborted:
                yield self._output(req, reply, "", [], i, FinishReason("abort", message="aborted"))
                return
            last = i == len(steps) - 1 or stop is not None
            reason = None
            if last:
                reason = FinishReason("stop", matched=stop) if stop is not None else FinishReason(reply.finish)
            out = self._output(req, reply, text, ids, i + 1, reason)
            if i == 0 and req.sampling_params.get("prompt_logprobs"):
                out.prompt_logprobs = [("P", None, []), ("Q", -0.5, [("Q", -0.5), ("alt", -2.0)][:top_k])]
            if want_logprobs:
                out.logprobs = [(text, -0.25, [(text, -0.25), ("alt", -1.5), ("other", -3.0)][:top_k])]
            yield out
            if last:
                return

    def _steps(self, req: GenerateReqInput, reply: ScriptedReply) -> List[Tuple[str, List[int], Optional[str]]]:
        """(text delta, token ids, matched stop string or None) per engine step."""
        if reply.token_ids is None:
            return [(chunk, [100 + i], None) for i, chunk in enumerate(reply.chunks)]
        detok = IncrementalDetokenizer(self.tokenizer, None, True, req.sampling_params.get("stop") or [])
        steps = []
        for token in reply.token_ids:
            text, stopped, matched = detok.add_tokens([token])
            steps.append((text, [token], matched if stopped else None))
            if stopped:
                return steps
        if steps:
            text, ids, _ = steps[-1]
            steps[-1] = (text + detok.finish(), ids, None)
        return steps

    @staticmethod
    def _output(
        req: GenerateReqInput, reply: ScriptedReply, text: str, ids: List[int], produced: int,
        reason: Optional[FinishReason],
    ) -> RequestOutput:
        return RequestOutput(
            rid=req.rid, text=text, token_ids=ids, finished=reason is not None, finish_reason=reason,
            prompt_tokens=reply.prompt_tokens, completion_tokens=produced, cached_tokens=reply.cached_tokens,
        )


def asgi_client(app: Any) -> httpx.AsyncClient:
    """An httpx client that calls the ASGI app in-process (app errors become 500 replies)."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def parse_sse(body: str) -> List[Any]:
    """The JSON payloads of an SSE body, with "[DONE]" kept as the string; asserts framing."""
    events = []
    for block in body.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: ") and "\n" not in block, f"bad SSE frame: {block!r}"
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events

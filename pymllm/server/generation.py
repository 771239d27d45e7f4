"""Running the engine requests behind one API request, and noticing when its client leaves.

An API request with n choices (or several prompts) becomes several engine requests; their
output streams are merged into one sequence of (choice index, chunk). Whoever ends the
group early (client gone, error, rejection) aborts the engine requests still running.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Awaitable, List, Optional, Tuple, TypeVar

import anyio
from starlette.requests import Request

from pymllm.engine.io_struct import FinishReason, GenerateReqInput, RequestOutput
from pymllm.server.engine_protocol import EngineDeadError, QueueFullError
from pymllm.server.errors import OpenAIError
from pymllm.server.state import ServerState

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away before its reply was complete."""


@dataclass
class ChoiceResult:
    """Everything one engine request produced so far."""

    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[tuple] = field(default_factory=list)
    prompt_logprobs: Optional[List[tuple]] = None
    finished: bool = False
    finish_reason: Optional[FinishReason] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        # Counts are cumulative in every chunk; keep the latest non-zero ones.
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens or self.completion_tokens
        self.cached_tokens = out.cached_tokens or self.cached_tokens
        if out.finished:
            self.finished = True
            self.finish_reason = out.finish_reason


def rejection_error(reason: Optional[FinishReason]) -> Optional[OpenAIError]:
    """The error of a request the engine refused (it carries an HTTP status), else None."""
    if reason is None or reason.status_code is None:
        return None
    return OpenAIError(reason.status_code, reason.message or "request rejected", code=reason.error_code)


class SubRequestGroup:
    def __init__(self, state: ServerState, public_id: str, reqs: List[GenerateReqInput]) -> None:
        self._state = state
        self.public_id = public_id
        self.reqs = reqs
        self.results = [ChoiceResult() for _ in reqs]
        self._queue: "asyncio.Queue[Tuple[int, Optional[RequestOutput], Optional[BaseException]]]" = (
            asyncio.Queue()
        )
        self._tasks: List[asyncio.Task] = []
        self._closed = False

    def start(self) -> "SubRequestGroup":
        self._state.check_capacity(len(self.reqs))
        self._state.active[self.public_id] = [r.rid for r in self.reqs]
        self._tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(self.reqs)]
        return self

    @property
    def done(self) -> bool:
        return all(r.finished for r in self.results)

    async def next(self) -> Tuple[int, RequestOutput]:
        """The next chunk of any choice. Raises OpenAIError for a rejected request or a
        full queue; other engine failures propagate as they are."""
        index, out, exc = await self._queue.get()
        result = self.results[index]
        if exc is not None:
            result.finished = True
            if isinstance(exc, QueueFullError):
                raise OpenAIError(503, str(exc) or "the server's request queue is full", code="queue_full")
            if isinstance(exc, EngineDeadError):
                raise OpenAIError(503, str(exc) or "the engine is not running", code="engine_dead")
            raise exc
        assert out is not None
        result.add(out)
        error = rejection_error(out.finish_reason) if out.finished else None
        if error is not None:
            raise error
        return index, out

    async def collect(self) -> List[ChoiceResult]:
        while not self.done:
            await self.next()
        return self.results

    async def close(self) -> None:
        """Stop pumping and abort every engine request that has not finished."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        # Shielded: close() often runs in a cancelled task (the client went away).
        with anyio.CancelScope(shield=True):
            for req, result in zip(self.reqs, self.results):
                if not result.finished:
                    try:
                        await self._state.client.abort(req.rid)
                    except Exception as exc:
                        logger.warning("abort of %s failed: %r", req.rid, exc)
        self._state.active.pop(self.public_id, None)

    async def _pump(self, index: int, req: GenerateReqInput) -> None:
        timer = self._state.metrics.timer()
        try:
            async for out in self._state.client.generate(req):
                timer.observe(out)
                await self._queue.put((index, out, None))
                if out.finished:
                    return
            ended = FinishReason("abort", message="the engine ended the request early")
            last = RequestOutput(rid=req.rid, text="", token_ids=[], finished=True, finish_reason=ended)
            await self._queue.put((index, last, None))
        except Exception as exc:
            await self._queue.put((index, None, exc))


async def _wait_disconnect(request: Request) -> None:
    # The body was read before the handler ran, so the next message can only be the
    # disconnect (servers send it too once the response is complete; we stop before that).
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class DisconnectWatcher:
    """Races awaitables against the client's disconnect."""

    def __init__(self, request: Request) -> None:
        self._watch = asyncio.ensure_future(_wait_disconnect(request))

    async def run(self, aw: Awaitable[T]) -> T:
        task = asyncio.ensure_future(aw)
        try:
            await asyncio.wait({task, self._watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise ClientDisconnected()

    def close(self) -> None:
        self._watch.cancel()


async def run_to_completion(request: Request, group: SubRequestGroup) -> List[ChoiceResult]:
    """Non-streaming: collect every choice, aborting the engine requests if the client leaves."""
    watcher = DisconnectWatcher(request)
    try:
        return await watcher.run(group.collect())
    finally:
        watcher.close()
        await group.close()


def usage_counts(results: List[ChoiceResult], n: int) -> Tuple[int, int, int]:
    """(prompt, completion, cached) tokens. Each prompt is counted once, not once per choice
    (results are grouped by prompt, n choices each)."""
    firsts = results[::n]
    return (
        sum(r.prompt_tokens for r in firsts),
        sum(r.completion_tokens for r in results),
        sum(r.cached_tokens for r in firsts),
    )

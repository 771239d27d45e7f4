"""EngineClient: the frontend's handle on the worker processes.

Sends requests to the tokenizer process and routes the detokenizer's outputs to per-request
asyncio queues. Requests that arrive as token ids need no tokenizer: given a ``request_tokenizer``
(the tokenizer process's validation, run here), they go straight to the scheduler, which saves a
process hop and the tokenizer's turn (~0.5-0.8 ms of every such request's time to first token);
their aborts follow the same way, so an abort never overtakes its request. A daemon thread
blocks on the inbound socket, so it works from any event loop (the HTTP server's or the offline
Engine's) without polling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Dict, Optional

import zmq

from pymllm.engine.io_struct import (
    AbortReq,
    BatchRequestOutput,
    ControlReq,
    ControlResp,
    FinishReason,
    GenerateReqInput,
    RequestOutput,
)
from pymllm.orchestrator.ipc import Endpoints, MessageSocket, WorkerFailed, push

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More requests in flight than --server.max_running_requests + --server.max_queued_requests."""


class EngineDeadError(RuntimeError):
    """A worker process died; the engine cannot serve."""


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class EngineClient:
    def __init__(
        self,
        endpoints: Endpoints,
        inbox: MessageSocket,
        model_name: str,
        context_length: int,
        tokenizer,
        max_in_flight: Optional[int] = None,
        request_tokenizer=None,
    ):
        self.model_name = model_name
        self.context_length = context_length
        self.tokenizer = tokenizer
        self.max_in_flight = max_in_flight
        self._to_tokenizer = push(zmq.Context.instance(), endpoints.tokenizer_in)
        # pymllm.orchestrator.tokenizer_process.RequestTokenizer, or None: everything via the tokenizer.
        self._request_tokenizer = request_tokenizer
        self._to_scheduler = push(zmq.Context.instance(), endpoints.scheduler_in) if request_tokenizer else None
        self._direct: set = set()  # rids sent straight to the scheduler (their aborts go there too)
        self._send_lock = threading.Lock()
        self._inbox = inbox
        self._pending: Dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._healthy = True
        self._death_reason: Optional[str] = None
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="engine-client-reader")
        self._reader.start()

    # ---------------- health ----------------
    def is_healthy(self) -> bool:
        return self._healthy

    def mark_dead(self, reason: str) -> None:
        """A worker died: fail every waiting request so no client hangs."""
        self._healthy = False
        self._death_reason = reason
        with self._pending_lock:
            pending = list(self._pending.items())
        for rid, p in pending:
            out = RequestOutput(rid, "", [], True, FinishReason("abort", message=reason, status_code=503))
            p.loop.call_soon_threadsafe(p.queue.put_nowait, out)

    # ---------------- sending ----------------
    def _send(self, msg) -> None:
        with self._send_lock:
            self._to_tokenizer.send(msg)

    def _send_request(self, req: GenerateReqInput) -> Optional[RequestOutput]:
        """Send a request on its way; returns the rejection when it is invalid (token-id
        requests are validated here, the others by the tokenizer process)."""
        if self._request_tokenizer is None or req.input_ids is None or req.text is not None or req.messages is not None:
            self._send(req)
            return None
        from pymllm.orchestrator.tokenizer_process import tokenize_or_reply

        tokenized = tokenize_or_reply(self._request_tokenizer, req)
        if isinstance(tokenized, BatchRequestOutput):
            return tokenized.outputs[0]
        with self._send_lock:
            self._direct.add(req.rid)
            self._to_scheduler.send(tokenized)
        return None

    def _send_abort(self, rid: str) -> None:
        with self._send_lock:
            if rid in self._direct:
                self._to_scheduler.send(AbortReq(rid))
            else:
                self._to_tokenizer.send(AbortReq(rid))

    async def generate(self, req: GenerateReqInput) -> AsyncIterator[RequestOutput]:
        """Yield the request's output chunks; the last one has finished=True."""
        if not self._healthy:
            raise EngineDeadError(self._death_reason or "engine is not running")
        loop = asyncio.get_running_loop()
        with self._pending_lock:
            if self.max_in_flight is not None and len(self._pending) >= self.max_in_flight:
                raise QueueFullError("the server is at capacity; retry later")
            if req.rid in self._pending:
                raise ValueError(f"request id {req.rid!r} is already in flight")
            self._pending[req.rid] = _Pending(loop, asyncio.Queue())
            queue = self._pending[req.rid].queue
        finished = False
        try:
            rejected = self._send_request(req)
            if rejected is not None:
                finished = True
                yield rejected
                return
            while True:
                out: RequestOutput = await queue.get()
                finished = out.finished
                if finished and out.finish_reason is not None and (out.finish_reason.status_code or 0) >= 500 \
                        and self._healthy:
                    # Ended by a failure outside the scheduler (the detokenizer's), which may still be
                    # generating for it: free its KV now.
                    self._send_abort(req.rid)
                yield out
                if finished:
                    return
        finally:
            with self._pending_lock:
                self._pending.pop(req.rid, None)
            if not finished and self._healthy:
                # The consumer went away (client disconnect, cancelled task): free the KV now.
                self._send_abort(req.rid)
            with self._send_lock:
                self._direct.discard(req.rid)

    async def abort(self, rid: str) -> None:
        self._send_abort(rid)

    async def control(self, kind: str, payload: Optional[dict] = None, timeout: float = 30.0) -> ControlResp:
        if not self._healthy:
            raise EngineDeadError(self._death_reason or "engine is not running")
        request_id = f"ctl-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        loop = asyncio.get_running_loop()
        with self._pending_lock:
            self._pending[request_id] = _Pending(loop, asyncio.Queue())
            queue = self._pending[request_id].queue
        try:
            self._send(ControlReq(kind, request_id, payload or {}))
            resp = await asyncio.wait_for(queue.get(), timeout)
            if isinstance(resp, RequestOutput):  # engine died while waiting
                raise EngineDeadError(resp.finish_reason.message if resp.finish_reason else "engine died")
            return resp
        finally:
            with self._pending_lock:
                self._pending.pop(request_id, None)

    # ---------------- receiving ----------------
    def _deliver(self, key: str, item) -> None:
        with self._pending_lock:
            p = self._pending.get(key)
        if p is not None:
            p.loop.call_soon_threadsafe(p.queue.put_nowait, item)

    def _read_loop(self) -> None:
        while True:
            try:
                msg = self._inbox.recv()
            except zmq.ContextTerminated:
                return
            except zmq.ZMQError:
                return
            if isinstance(msg, BatchRequestOutput):
                for out in msg.outputs:
                    self._deliver(out.rid, out)
            elif isinstance(msg, ControlResp):
                self._deliver(msg.request_id, msg)
            elif isinstance(msg, WorkerFailed):
                logger.error("worker %s failed: %s", msg.name, msg.error)
                self.mark_dead(f"{msg.name} failed: {msg.error}")
            else:
                logger.warning("unexpected message %r", type(msg).__name__)

    def close(self) -> None:
        self._to_tokenizer.close()
        if self._to_scheduler is not None:
            self._to_scheduler.close()


def new_request_id() -> str:
    return uuid.uuid4().hex

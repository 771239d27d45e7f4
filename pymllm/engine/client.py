"""EngineClient: the frontend's handle on the worker processes.

Sends requests to the tokenizer process and routes the detokenizer's outputs to per-request
asyncio queues. A daemon thread blocks on the inbound socket, so it works from any event loop
(the HTTP server's or the offline Engine's) without polling.
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
    ):
        self.model_name = model_name
        self.context_length = context_length
        self.tokenizer = tokenizer
        self.max_in_flight = max_in_flight
        self._to_tokenizer = push(zmq.Context.instance(), endpoints.tokenizer_in)
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
            self._send(req)
            while True:
                out: RequestOutput = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            with self._pending_lock:
                self._pending.pop(req.rid, None)
            if not finished and self._healthy:
                # The consumer went away (client disconnect, cancelled task): free the KV now.
                self._send(AbortReq(req.rid))

    async def abort(self, rid: str) -> None:
        self._send(AbortReq(rid))

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


def new_request_id() -> str:
    return uuid.uuid4().hex

"""ZMQ plumbing between processes: endpoints, typed-message sockets, parent-death watch.

Messages are the dataclasses of pymllm.engine.io_struct, pickled. All receives block, so idle
workers use no CPU.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import zmq


@dataclass(frozen=True)
class Endpoints:
    tokenizer_in: str
    scheduler_in: str
    detokenizer_in: str
    frontend_in: str

    @classmethod
    def create(cls) -> "Endpoints":
        base = os.path.join(tempfile.gettempdir(), f"pymllm-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        return cls(*(f"ipc://{base}-{name}" for name in ("tok", "sched", "detok", "front")))


@dataclass
class WorkerReady:
    name: str
    info: dict


@dataclass
class WorkerFailed:
    name: str
    error: str


class MessageSocket:
    """A PUSH or PULL socket that sends and receives pickled dataclasses."""

    def __init__(self, context: zmq.Context, kind: int, endpoint: str, bind: bool):
        self.socket = context.socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        if bind:
            self.socket.bind(endpoint)
        else:
            self.socket.connect(endpoint)

    def send(self, obj: Any) -> None:
        self.socket.send(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self, block: bool = True) -> Optional[Any]:
        try:
            data = self.socket.recv(0 if block else zmq.NOBLOCK)
        except zmq.Again:
            return None
        return pickle.loads(data)

    def close(self) -> None:
        self.socket.close(0)


def push(context: zmq.Context, endpoint: str) -> MessageSocket:
    return MessageSocket(context, zmq.PUSH, endpoint, bind=False)


def pull(context: zmq.Context, endpoint: str) -> MessageSocket:
    return MessageSocket(context, zmq.PULL, endpoint, bind=True)


def exit_when_parent_dies(parent_conn) -> None:
    """Block a daemon thread on a pipe from the parent; its EOF means the parent is gone."""

    def watch():
        try:
            parent_conn.recv()
        except (EOFError, OSError):
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()

"""What every worker process does at start: logging, parent watch, failure reporting."""

from __future__ import annotations

import logging
import os
import traceback
from typing import Callable

import zmq

from pymllm.orchestrator.ipc import WorkerFailed, exit_when_parent_dies, push


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s [{name}] %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def run_worker(name: str, log_level: str, frontend_in: str, parent_conn, body: Callable[[], None]) -> None:
    setup_logging(log_level, name)
    exit_when_parent_dies(parent_conn)
    try:
        body()
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # report any start-up or loop failure to the frontend
        logging.getLogger(name).error("%s failed:\n%s", name, traceback.format_exc())
        sock = push(zmq.Context.instance(), frontend_in)
        sock.send(WorkerFailed(name, f"{type(exc).__name__}: {exc}"))
        sock.socket.close(linger=1000)
        os._exit(1)

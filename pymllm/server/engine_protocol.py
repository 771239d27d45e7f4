"""The interface the HTTP process needs from the engine (implemented in pymllm.engine.client)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Dict, Optional, Protocol

# The engine's own exceptions, so the fake client and the real one raise the same classes:
# QueueFullError (the queue bound is exceeded) and EngineDeadError (a worker died); both 503.
from pymllm.engine.client import EngineDeadError, QueueFullError
from pymllm.engine.io_struct import ControlResp, GenerateReqInput, RequestOutput

__all__ = ["EngineClient", "EngineDeadError", "QueueFullError"]


class EngineClient(Protocol):
    model_name: str  # the served model name
    context_length: int
    tokenizer: Any  # transformers.PreTrainedTokenizerBase, loaded in the HTTP process too

    def generate(self, req: GenerateReqInput) -> AsyncIterator[RequestOutput]:
        """Yield text-delta chunks of one request; the last has ``finished=True``.

        A rejected request yields a single finished chunk whose finish_reason has type
        "abort" and a ``status_code``. Raises QueueFullError when the queue is full and
        EngineDeadError once a worker died.
        """
        ...

    async def abort(self, rid: str) -> None: ...

    async def control(self, kind: str, payload: Optional[Dict[str, Any]] = None) -> ControlResp:
        """Raises EngineDeadError once a worker died."""
        ...

    def is_healthy(self) -> bool: ...

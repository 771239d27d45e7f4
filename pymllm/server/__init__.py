"""HTTP process: the OpenAI-compatible and native API over an EngineClient."""

from pymllm.server.app import create_app
from pymllm.server.engine_protocol import EngineClient, QueueFullError

__all__ = ["EngineClient", "QueueFullError", "create_app"]

"""What the route handlers of one app share."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Type

from pymllm.configs.server_config import ServerConfig
from pymllm.parsers.reasoning import ReasoningParser, get_reasoning_parser, template_opens_reasoning
from pymllm.server.engine_protocol import EngineClient
from pymllm.server.errors import OpenAIError, bad_request
from pymllm.server.metrics import ServerMetrics

# Model names accepted besides the served name: clients that do not care send "default".
_MODEL_ALIASES = ("default",)
# Template kwargs come from clients; bound the probe cache so they cannot grow it forever.
_MAX_PROBE_CACHE = 256


@dataclass
class ServerState:
    client: EngineClient
    config: ServerConfig
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))
    # API request id -> engine rids, so /abort_request can stop all n choices of one id.
    active: Dict[str, List[str]] = field(default_factory=dict)
    _reasoning_open: Dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = self.config.reasoning_parser
        self.reasoning_parser: Optional[Type[ReasoningParser]] = (
            get_reasoning_parser(name) if name else None
        )

    @property
    def model_name(self) -> str:
        return self.client.model_name

    @property
    def vocab_size(self) -> int:
        return len(self.client.tokenizer)

    def check_model(self, name: Optional[str]) -> None:
        if name is None or name == self.model_name or name in _MODEL_ALIASES:
            return
        raise OpenAIError(
            404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
            code="model_not_found", param="model",
        )

    def check_capacity(self, engine_requests: int) -> None:
        """Refuse a request that fans out (n choices, a batch of prompts) into more engine
        requests than the engine ever admits at once: it would get the queue-full 503 even on
        an idle server, and retrying could never help."""
        if self.config.max_queued_requests is None:
            return
        capacity = self.config.max_running_requests + self.config.max_queued_requests
        if engine_requests > capacity:
            raise bad_request(
                f"this request needs {engine_requests} generations at once (n times the number of "
                f"prompts); this server admits at most {capacity}", "n",
            )

    def reasoning_open(self, chat_template_kwargs: Optional[Dict[str, Any]]) -> bool:
        """Whether replies start inside a reasoning block; cached per template kwargs."""
        assert self.reasoning_parser is not None
        key = json.dumps(chat_template_kwargs or {}, sort_keys=True, default=str)
        if key not in self._reasoning_open:
            if len(self._reasoning_open) >= _MAX_PROBE_CACHE:
                self._reasoning_open.clear()
            self._reasoning_open[key] = template_opens_reasoning(
                self.client.tokenizer, self.reasoning_parser, chat_template_kwargs
            )
        return self._reasoning_open[key]

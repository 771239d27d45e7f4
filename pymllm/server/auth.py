"""``--server.api_key``: every route needs ``Authorization: Bearer <key>``, except probes.

Open routes: /health and /health_generate (load balancers and orchestrators probe without
credentials) and /metrics (Prometheus scrapers usually carry none; it exposes counts and
latencies only, never request content).
"""

from __future__ import annotations

import hmac
from typing import Any, Dict

from pymllm.server.errors import OpenAIError

OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics"})


class ApiKeyMiddleware:
    """Pure ASGI middleware: also guards routes that do not exist (401 before 404), so an
    unauthenticated client learns nothing about the API surface."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        response = OpenAIError(
            401, "Missing or invalid API key; send 'Authorization: Bearer <key>'.", code="invalid_api_key"
        ).to_response()
        await response(scope, receive, send)

    def _authorized(self, scope: Dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                # Constant-time comparison: the key must not leak through response timing.
                return hmac.compare_digest(value.strip(), self._expected)
        return False

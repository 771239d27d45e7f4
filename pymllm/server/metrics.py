"""Prometheus metrics of one app, in a registry of its own (tests build many apps per process).

Request counts, token counts and latencies are recorded as requests run; the engine's load
(running, queued, KV usage) is asked for at scrape time so the gauges are never stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Dict, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pymllm.engine.io_struct import RequestOutput

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
_SERVER_INFO_TIMEOUT_S = 5.0

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pymllm_requests", "HTTP requests by route and status code.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("pymllm_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(
            "pymllm_generation_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.running = Gauge("pymllm_num_requests_running", "Requests being decoded.", registry=r)
        self.queued = Gauge("pymllm_num_requests_queued", "Requests waiting for a batch slot.", registry=r)
        # Prefix-cache entries no request uses stay in the pool until space is needed; like
        # SGLang's token usage and vLLM's cache usage, "used" leaves them out (an idle server
        # with a full prefix cache is not a saturated one) and they get a gauge of their own.
        self.kv_used = Gauge(
            "pymllm_kv_cache_used_tokens", "KV cache slots held by requests (evictable cached prefixes excluded).",
            registry=r,
        )
        self.kv_evictable = Gauge(
            "pymllm_kv_cache_evictable_tokens", "KV cache slots of cached prefixes no request uses (reclaimable).",
            registry=r,
        )
        self.kv_total = Gauge("pymllm_kv_cache_total_tokens", "KV cache capacity in tokens.", registry=r)
        self.kv_usage = Gauge(
            "pymllm_kv_cache_usage_ratio", "Fraction of the KV cache held by requests (evictable prefixes excluded).",
            registry=r,
        )
        self.ttft = Histogram(
            "pymllm_time_to_first_token_seconds", "Time to the first generated token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "pymllm_inter_token_latency_seconds", "Time between generated tokens.",
            buckets=_TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "pymllm_e2e_request_latency_seconds", "Time from arrival to the last token.",
            buckets=_E2E_BUCKETS, registry=r,
        )

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    async def render(self, control: Callable[[str], Awaitable[Any]]) -> bytes:
        """Refresh the load gauges from the engine's server_info, then expose everything."""
        try:
            resp = await asyncio.wait_for(control("server_info"), _SERVER_INFO_TIMEOUT_S)
            if resp.ok:
                self._set_load(resp.payload)
        except Exception as exc:  # a scrape must still answer when the engine is busy or gone
            logger.warning("metrics: server_info failed: %r", exc)
        return generate_latest(self.registry)

    def _set_load(self, info: Dict[str, Any]) -> None:
        self.running.set(info.get("running", 0))
        self.queued.set(info.get("queued", 0))
        evictable, total = info.get("kv_evictable", 0), info.get("kv_total", 0)
        used = info.get("kv_used", 0) - evictable
        self.kv_used.set(used)
        self.kv_evictable.set(evictable)
        self.kv_total.set(total)
        self.kv_usage.set(used / total if total else 0.0)


class RequestTimer:
    """Latency bookkeeping of one engine request, fed with each of its output chunks."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last_token_time: Optional[float] = None

    def observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if out.token_ids:
            if self._last_token_time is None:
                self._metrics.ttft.observe(now - self._start)
            else:
                # A chunk may carry several tokens; spread its gap over them.
                per_token = (now - self._last_token_time) / len(out.token_ids)
                for _ in out.token_ids:
                    self._metrics.itl.observe(per_token)
            self._last_token_time = now
        if out.finished and not (out.finish_reason and out.finish_reason.status_code):
            self._metrics.e2e.observe(now - self._start)
            self._metrics.prompt_tokens.inc(out.prompt_tokens)
            self._metrics.generation_tokens.inc(out.completion_tokens)


class RequestCountMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware, which interferes with streaming and
    disconnect detection) counting requests by route template and status code."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_with_status(message: Dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            # The route template, not the raw path, keeps label cardinality bounded.
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()

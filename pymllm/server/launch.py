"""python -m pymllm.server.launch [--server.<field> ...]: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import time
from typing import List, Optional

from pymllm.configs import ConfigError, GlobalConfig, parse_config

logger = logging.getLogger("pymllm.server")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: GlobalConfig) -> int:
    import uvicorn

    from pymllm.engine.launch import Engine, EngineStartupError
    from pymllm.orchestrator.gc_control import start_serving
    from pymllm.server.app import create_app

    server = config.server
    if not _is_loopback(server.host) and not server.api_key:
        logger.warning(
            "Listening on %s without --server.api_key: anyone who can reach this port can use the model",
            server.host,
        )
    if not _is_loopback(server.host) and not server.allowed_local_media_path:
        logger.warning(
            "Listening on %s without --server.allowed_local_media_path: image requests can read any "
            "file this process can read", server.host,
        )
    worker_died: List[str] = []

    def on_worker_death(reason: str) -> None:
        worker_died.append(reason)
        logger.error("Shutting down: %s", reason)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn turns this into a graceful exit

    started = time.perf_counter()
    try:
        engine = Engine(config, on_worker_death=on_worker_death)
    except (EngineStartupError, ConfigError) as e:
        logger.error("Start-up failed: %s", e)
        return 1
    try:
        app = create_app(engine.client, server)
        logger.info(
            "Serving %s on http://%s:%d (ready in %.1f s)",
            engine.client.model_name, server.host, server.port, time.perf_counter() - started,
        )
        # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the
        # handler that was installed before it; this one lets us reach engine.shutdown() below.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _: logger.info("%s: shutting down", signal.Signals(signum).name))
        start_serving("http", server.gc_warn_ms)
        uvicorn.run(app, host=server.host, port=server.port, log_level=server.log_level, timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
    return 1 if worker_died else 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        config = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, config.server.log_level.upper()),
        format="%(asctime)s [http] %(levelname)s %(name)s: %(message)s",
    )
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())

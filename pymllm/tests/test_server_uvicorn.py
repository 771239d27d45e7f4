"""The app under a real uvicorn on loopback: real SSE streaming and real client disconnects."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from pymllm.configs.server_config import ServerConfig
from pymllm.server import create_app
from pymllm.server.testing import FakeEngineClient, ScriptedReply

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def served():
    """Yields (fake engine, base url) of a uvicorn server running in a thread."""
    fake = FakeEngineClient(ScriptedReply(chunks=["tok "] * 400, delay_s=0.005))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(fake, ServerConfig()), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _wait_for(condition, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_events_arrive_incrementally(served):
    fake, url = served
    fake._script = lambda req: ScriptedReply(chunks=["a", "b", "c"], delay_s=0.2)
    arrivals = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": USER, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.perf_counter())
    assert len(arrivals) >= 5  # role, a, b, c, finish, [DONE]
    # Not buffered until the end: that would put every event within a few ms of the last. The
    # chunks come 0.2 s apart, so the first content event is ~0.4 s before the last; a loaded
    # 2-core CI machine was seen to shrink that to 0.28 s.
    assert arrivals[-1] - arrivals[1] > 0.15


def test_stream_closed_by_the_client_aborts(served):
    fake, url = served
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": USER, "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
    assert _wait_for(lambda: fake.aborted == [fake.requests[0].rid])


def test_non_streaming_client_timeout_aborts(served):
    fake, url = served
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 400}, timeout=0.3)
    assert _wait_for(lambda: fake.aborted == [fake.requests[0].rid])

"""scripts/hop_trace: the import-time patches record hops, and analyze.py splits a request's
time to first token into them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACE_DIR = ROOT / "scripts" / "hop_trace"

# The sockets are closed and the context terminated explicitly: left to interpreter shutdown,
# the context can be terminated while a socket is still open, and then it waits forever. A
# receive timeout turns a lost message into a failure instead of a hang.
_CHILD = """
from pymllm.engine.io_struct import AbortReq
from pymllm.orchestrator.ipc import Endpoints, pull, push
import zmq
ends = Endpoints.create()
ctx = zmq.Context()
inbox = pull(ctx, ends.scheduler_in)
inbox.socket.setsockopt(zmq.RCVTIMEO, 20000)
outbox = push(ctx, ends.scheduler_in)
outbox.send(AbortReq("rid-1234"))
got = inbox.recv()
outbox.close()
inbox.close()
ctx.term()
assert got == AbortReq("rid-1234"), got
"""


def test_patched_sockets_log_their_messages(tmp_path):
    env = {**os.environ, "PYMLLM_HOP_TRACE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(TRACE_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True, timeout=60)
    lines = "".join(p.read_text() for p in tmp_path.glob("*.log")).splitlines()
    assert [line.split()[2:] for line in lines] == [["send", "AbortReq", "rid-1234"], ["recv", "AbortReq", "rid-1234"]]


def test_analyze_splits_the_time_to_first_token(tmp_path, capsys):
    t = 1000.0
    events = [
        (t + 0.0000, "client", f"start={t:.6f} ttft_ms=10.000 cached=2000"),
        (t + 0.0020, "recv", "TokenizedGenerateReq gen-1"),
        (t + 0.0022, "next_batch", "ForwardMode.EXTEND"),
        (t + 0.0030, "build_forward_batch", "x"),
        (t + 0.0031, "forward", "x"),
        (t + 0.0081, "sample", "x"),
        (t + 0.0082, "send", "BatchTokenIDOut gen-1"),
        (t + 0.0085, "recv", "BatchTokenIDOut gen-1"),
        (t + 0.0086, "send", "BatchRequestOutput gen-1"),
        (t + 0.0089, "recv", "BatchRequestOutput gen-1"),
    ]
    (tmp_path / "1.log").write_text("".join(f"{ts:.6f} 1 {tag} {d}\n" for ts, tag, d in events))
    out = subprocess.run([sys.executable, str(TRACE_DIR / "analyze.py"), str(tmp_path), "--skip", "0"],
                         capture_output=True, text=True, check=True).stdout
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[1:]}
    assert "median TTFT 10.000 ms" in out.splitlines()[0]
    assert rows["sched_recv"] == 2.0 and rows["sample_end"] == 5.0 and rows["client_first"] == 1.1
    assert "front_send" not in rows  # token ids went straight to the scheduler

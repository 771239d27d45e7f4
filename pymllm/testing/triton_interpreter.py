"""Running Triton kernels in Triton's interpreter (TRITON_INTERPRET=1), for the CPU tests.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the interpreter cannot be switched on
inside a process that has imported the kernels: the tests run their checks in a child Python.

Not every Triton runs our kernels there. Triton 3.6's interpreter turns a scalar kernel argument
into a one-element array and takes ``int()`` of it to bound a ``range`` loop, which NumPy 2.4
refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a
loop over a run-time bound fails before it computes anything. When a check fails, a one-line
probe kernel tells such an interpreter apart, and the check is then skipped with the probe's error
as the reason instead of failing on the environment; checks that do run there still count. CI
(``CI`` set) never skips: its pinned environment must run them all.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def probe(out_ptr, n):
    for i in range(0, n):
        tl.store(out_ptr + i, i)

out = torch.zeros(3, dtype=torch.int32)
probe[(1,)](out, 3)
assert out.tolist() == [0, 1, 2], out.tolist()
"""


def interpreter_env() -> Dict[str, str]:
    """This process's environment with TRITON_INTERPRET=1 and the repository's two packages first
    on PYTHONPATH (the child must import this checkout, not an installed copy)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    paths = (str(REPO), str(REPO / "mllm-kernel"), env.get("PYTHONPATH"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run_in_interpreter(argv: Sequence[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``python argv...`` in a child with the interpreter on (interpreter_env), run from the
    repository root; returns the finished process with its output captured."""
    return subprocess.run([sys.executable, *argv], env=interpreter_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@functools.lru_cache(maxsize=None)
def interpreter_unusable_reason() -> Optional[str]:
    """None where Triton's interpreter runs the probe kernel (a loop over a run-time bound), else
    why not: the Triton version and the probe's last error line."""
    result = run_in_interpreter(["-c", _PROBE], timeout=300)
    if result.returncode == 0:
        return None
    import triton

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    error = lines[-1] if lines else f"exit code {result.returncode}"
    return f"Triton {triton.__version__}'s interpreter cannot run a loop over a run-time bound here: {error}"


def check_in_interpreter(argv: Sequence[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """run_in_interpreter, for a test: skipped without Triton; when the child fails where (outside
    CI) the interpreter also fails the probe, skipped with the probe's reason; otherwise the
    finished process, for the caller's assertions."""
    import pytest

    pytest.importorskip("triton")
    result = run_in_interpreter(argv, timeout=timeout)
    if result.returncode != 0 and not os.environ.get("CI"):
        reason = interpreter_unusable_reason()
        if reason is not None:
            pytest.skip(reason)
    return result

"""Compile several kernel instances at once: the first start of a model builds a dozen.

Each JIT build is one nvcc (or c++) process, single-threaded for most of its time, and a model's
first start needs several of them (the decode GEMVs of its weight kind, their fused forms, the
CUTLASS GEMM, the KV-cache kernels): one after another they took over three minutes on an H200
host. ``build_in_parallel`` runs the builds on a thread pool (the threads wait on their compiler
processes, so the GIL is no bottleneck); the disk cache publishes each entry atomically, so
parallel builds and later loads never see half-written libraries. Steps whose kernel is already
cached only load it.

``MLLM_KERNEL_JIT_JOBS`` caps the builds at once; by default one per CPU core, at most one per
3 GiB of memory (a CUTLASS build needs ~2 GiB), at most one per step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

JOBS_ENV = "MLLM_KERNEL_JIT_JOBS"
_BYTES_PER_JOB = 3 << 30


@dataclass(frozen=True)
class BuildStep:
    """One kernel build: its name for the logs and the call that compiles or loads it."""

    name: str
    run: Callable[[], Any]


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_jobs(steps: int) -> int:
    """Builds at once for ``steps`` steps: ``MLLM_KERNEL_JIT_JOBS`` if set, else cores and memory."""
    override = os.environ.get(JOBS_ENV)
    if override:
        try:
            jobs = int(override)
        except ValueError:
            raise ValueError(f"{JOBS_ENV} must be a positive integer, got {override!r}") from None
        if jobs < 1:
            raise ValueError(f"{JOBS_ENV} must be a positive integer, got {override!r}")
        return min(jobs, max(steps, 1))
    memory = _memory_bytes()
    by_memory = max(1, memory // _BYTES_PER_JOB) if memory else 1
    return max(1, min(steps, os.cpu_count() or 1, by_memory))


def unique_steps(steps: Sequence[BuildStep]) -> list[BuildStep]:
    """The steps with repeated names dropped (layers of one kind ask for the same kernels)."""
    seen: dict[str, BuildStep] = {}
    for step in steps:
        seen.setdefault(step.name, step)
    return list(seen.values())


class _Skipped(Exception):
    """A step not started because the builds were stopped."""


def build_in_parallel(steps: Sequence[BuildStep], jobs: int | None = None,
                      stop: threading.Event | None = None) -> dict[str, BaseException]:
    """Run every step (duplicates by name once) on ``jobs`` threads; returns the failures by
    name. A failure is logged, not raised: the kernel's own first call raises it again, where
    its caller decides whether to fall back. Once ``stop`` is set, steps not yet started are
    skipped (running compiles finish), so an interrupted start does not wait for all of them."""
    steps = unique_steps(steps)
    if not steps:
        return {}
    jobs = default_jobs(len(steps)) if jobs is None else max(1, min(jobs, len(steps)))
    start = time.perf_counter()
    logger.info("building %d JIT kernel(s) on %d thread(s) (cached ones only load)", len(steps), jobs)

    def run(step: BuildStep) -> Any:
        if stop is not None and stop.is_set():
            raise _Skipped
        return step.run()

    failures: dict[str, BaseException] = {}
    skipped = 0
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="mllm-kernel-jit") as pool:
        futures = {pool.submit(run, step): step for step in steps}
        for done, future in enumerate(as_completed(futures), 1):
            step = futures[future]
            error = future.exception()
            if isinstance(error, _Skipped):
                skipped += 1
            elif error is not None:
                failures[step.name] = error
                logger.warning("JIT kernel %s failed to build (%d/%d): %s", step.name, done, len(steps), error)
            else:
                logger.info("JIT kernel %s ready (%d/%d, %.1f s)", step.name, done, len(steps),
                            time.perf_counter() - start)
    logger.info("JIT kernels ready in %.1f s (%d built or loaded, %d failed%s)", time.perf_counter() - start,
                len(steps) - len(failures) - skipped, len(failures), f", {skipped} skipped: stopped" if skipped else "")
    return failures

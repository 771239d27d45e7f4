"""Keep Python's cyclic garbage collector from pausing the serving processes.

A full (generation 2) collection walks every tracked object the process holds. After start-up
that is hundreds of thousands of them (torch, transformers, the tokenizer's vocabulary, the
model's modules), none of which will ever be garbage, so each full collection paused a serving
process for 90-230 ms on the CI machine and 210-330 ms on an H100 host (docs/perf, T171), and
every stream that process serves stalls for it.
Freezing the start-up heap moves those objects out of the collector's scans; a full collection
then walks only what serving itself keeps alive.

Each process also reports collections that still pause it for long (``--server.gc_warn_ms``),
since such a pause shows up as a stall in every stream the process serves.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> Tuple[int, float]:
    """Collect once, then move every surviving object out of future collections' scans; returns
    (objects frozen, seconds taken). Call when a process has finished starting."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count(), time.perf_counter() - start


class GcPauseWarning:
    """A ``gc.callbacks`` hook that logs each collection pausing the process longer than
    ``threshold_ms``. ``clock`` is injectable for tests."""

    def __init__(self, process: str, threshold_ms: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.process = process
        self.threshold_s = threshold_ms / 1e3
        self.clock = clock
        self.longest_s = 0.0
        self._started: Optional[float] = None

    def __call__(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._started = self.clock()
            return
        if self._started is None:  # installed mid-collection
            return
        paused = self.clock() - self._started
        self._started = None
        self.longest_s = max(self.longest_s, paused)
        if paused > self.threshold_s:
            logger.warning(
                "%s: garbage collection of generation %d paused the process for %.0f ms (%d objects collected)",
                self.process, info.get("generation", -1), paused * 1e3, info.get("collected", 0),
            )

    def install(self) -> "GcPauseWarning":
        gc.callbacks.append(self)
        return self

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


def watch_gc_pauses(process: str, threshold_ms: float) -> Optional[GcPauseWarning]:
    """Install the warning unless ``threshold_ms`` is 0 (off)."""
    if threshold_ms <= 0:
        return None
    return GcPauseWarning(process, threshold_ms).install()


def start_serving(process: str, gc_warn_ms: float) -> None:
    """What a server process does with its collector once it has started, just before it serves:
    freeze the start-up heap, then watch for long pauses (start-up's own collections are not
    pauses in serving, so the watch begins here)."""
    frozen, seconds = freeze_startup_heap()
    watching = watch_gc_pauses(process, gc_warn_ms) is not None
    logger.info(
        "%s: %d start-up objects moved out of the garbage collector's scans (%.0f ms)%s",
        process, frozen, seconds * 1e3,
        f"; collections pausing it over {gc_warn_ms:g} ms will be logged" if watching else "",
    )

"""Timing and reporting shared by the benchmarks.

GPU times are the median over repetitions of a CUDA-event pair around one
call, with L2 flushed before each repetition (as triton.testing.do_bench
does), so bandwidth figures reflect DRAM traffic. CPU times are the median
of perf_counter around one call. Rows are appended as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, List

import torch

_L2_FLUSH_BYTES = 256 << 20


def parse_args(description: str, default_out: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repetitions (CPU check)")
    parser.add_argument("--reps", type=int, default=100, help="timed repetitions per case")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / default_out, help="JSONL file to append to"
    )
    args = parser.parse_args()
    if args.smoke:
        args.reps = min(args.reps, 5)
    return args


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def median_time_us(fn: Callable[[], Any], device: str, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):  # also triggers the JIT compile/load
        fn()
    if device == "cpu":
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return statistics.median(samples)

    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends))


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, read + write bytes counted."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    seconds = median_time_us(lambda: dst.copy_(src), "cuda", max(5, reps // 4)) * 1e-6
    return 2 * src.numel() * 4 / seconds


def graph_time_us(calls: List[Callable[[], object]], reps: int) -> float:
    """Median replay time of a graph running ``calls`` back to back, per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: JIT builds, Triton autotune, workspaces
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(max(3, reps // 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(samples)


def report(out: Path, row: dict[str, Any]) -> None:
    """Append ``row`` (plus environment fields) to ``out`` and print a one-line summary."""
    row = {"torch": torch.__version__, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as file:
        file.write(json.dumps(row) + "\n")
    shape = " ".join(f"{key}={value}" for key, value in row["shape"].items())
    print(f"{row['impl']:>12}  {shape:<40} {row['dtype']:<9} {row['time_us']:>10.2f} us  {row['gbps']:>8.1f} GB/s")

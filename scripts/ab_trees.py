"""The decode step of two source trees, processes alternating: how kernel and plan variants are judged.
In this project the cold-L2 kernel sweeps and the dispatcher's per-kernel graphs have both misjudged
the step (docs/perf/README.md, runs T212, T217, T218), so a variant is kept only if the step says so.

    python scripts/ab_trees.py prepare REF DIR
    python scripts/ab_trees.py run --baseline DIR [--rounds N] [--result-file F] [--timeout S] -- ARGS

``prepare`` (here, in the git checkout) writes REF's pymllm, mllm-kernel and benchmarks into DIR, a
folder to carry to the GPU machine. ``run`` (there) alternates ``python -m pymllm.bench_one_batch
ARGS`` in this tree ("ours") and in DIR ("base"), each process in its own tree with its own
PYTHONPATH (so each JIT-builds its own kernels), appends every result row to the result file with
run_name ours-1, base-1, ours-2, ..., and prints, per batch size, each process's decode ms (the
CUDA graph's when it ran) and ours / base of their medians.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
TREE_PARTS = ("pymllm", "mllm-kernel", "benchmarks")
TREES = ("ours", "base")


def prepare(ref: str, dest: Path, repo: Path = ROOT) -> None:
    """REF's TREE_PARTS from ``repo``'s git history, extracted into ``dest``."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", ref, *TREE_PARTS],
                             check=True, capture_output=True).stdout
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")


def bench_command(tree: Path, run_name: str, result_file: Path, bench_args: Sequence[str]
                  ) -> Tuple[List[str], Dict[str, str]]:
    """The argv and environment of one bench_one_batch process in ``tree``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(tree), str(tree / "mllm-kernel"),
                                                      os.environ.get("PYTHONPATH"))))
    argv = [sys.executable, "-m", "pymllm.bench_one_batch", *bench_args, "--run-name", run_name,
            "--result-filename", str(result_file)]
    return argv, env


def decode_ms(row: dict) -> float:
    """A result row's decode step in ms: the CUDA graph's replay where it ran, else the median step."""
    seconds = row.get("decode_graph_latency") or row["median_decode_latency"]
    return seconds * 1e3


def summary(rows: Sequence[dict]) -> List[str]:
    """Per batch size: each process's decode ms by tree, and ours / base of the medians."""
    by_size: Dict[int, Dict[str, List[float]]] = {}
    for row in rows:
        tree = row["run_name"].rpartition("-")[0]
        if tree in TREES:
            by_size.setdefault(row["batch_size"], {t: [] for t in TREES})[tree].append(decode_ms(row))
    lines = []
    for size in sorted(by_size):
        times = by_size[size]
        parts = [f"batch {size}:"] + [f"{t} " + " / ".join(f"{v:.3f}" for v in times[t]) + " ms" for t in TREES]
        if all(times[t] for t in TREES):
            ratio = statistics.median(times["ours"]) / statistics.median(times["base"])
            parts.append(f"ours / base {ratio:.3f}")
        lines.append("  ".join(parts))
    return lines


def run(baseline: Path, rounds: int, result_file: Path, timeout: float, bench_args: Sequence[str],
        root: Path = ROOT) -> List[str]:
    """Alternate the two trees for ``rounds`` rounds; returns the summary lines of this run's rows."""
    names = []
    for round_index in range(1, rounds + 1):
        for tree_name, tree in zip(TREES, (root, baseline)):
            name = f"{tree_name}-{round_index}"
            argv, env = bench_command(tree, name, result_file, bench_args)
            start = time.monotonic()
            try:
                code = subprocess.run(argv, cwd=tree, env=env, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            print(f"{name}: rc {code} in {time.monotonic() - start:.0f} s", flush=True)
            names.append(name)
    rows = []
    if result_file.exists():
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    return summary([row for row in rows if row.get("run_name") in names])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python scripts/ab_trees.py", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    prep = verbs.add_parser("prepare", help="write REF's pymllm, mllm-kernel and benchmarks into DIR")
    prep.add_argument("ref", help="a git revision of this checkout")
    prep.add_argument("dest", type=Path, help="the folder to write (carry it to the GPU machine)")
    ab = verbs.add_parser("run", help="alternate bench_one_batch in this tree and in --baseline")
    ab.add_argument("--baseline", type=Path, required=True, help="a folder written by prepare")
    ab.add_argument("--rounds", type=int, default=2, help="processes per tree (default 2)")
    ab.add_argument("--result-file", type=Path, default=Path("ab_trees.jsonl"),
                    help="JSONL that every process appends its rows to (default ab_trees.jsonl)")
    ab.add_argument("--timeout", type=float, default=600.0, help="seconds per process (default 600)")
    ab.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then bench_one_batch's arguments")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    if args.verb == "prepare":
        prepare(args.ref, args.dest)
        return 0
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if any(a.startswith(("--run-name", "--result-filename")) for a in bench_args):
        raise SystemExit("ab_trees.py names the runs and the result file itself")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if not (args.baseline / "pymllm").is_dir():
        raise SystemExit(f"{args.baseline} holds no pymllm/: write it with `ab_trees.py prepare REF DIR`")
    for line in run(args.baseline.resolve(), args.rounds, args.result_file.resolve(), args.timeout, bench_args):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

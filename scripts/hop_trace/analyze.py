"""Per-request hop timeline from the logs of sitecustomize.py (this directory).

    python scripts/hop_trace/analyze.py TRACE_DIR [--timeline N] [--skip K]

For every client request (bench_serving's record of its start and time to first token) it
finds the first occurrence of each mark inside that window and prints, for cached and uncached
requests separately, the median time from each mark to the next. ``--timeline N`` also prints
the raw events of the last N requests.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
from typing import Dict, List, Tuple

Event = Tuple[float, str, str, str]  # (wall time, pid, tag, detail)

# (name, tag, detail prefix) in the order a request meets them; the first match after the
# previous mark counts. The frontend's GenerateReqInput send only happens for requests that go
# through the tokenizer process (token-id requests go straight to the scheduler).
MARKS = [
    ("handler_in", "handler_in", ""),
    ("front_send", "send", "GenerateReqInput"),
    ("sched_recv", "recv", "TokenizedGenerateReq"),
    ("scheduled", "next_batch", ""),
    ("build_end", "build_forward_batch", ""),
    ("forward_end", "forward", ""),
    ("sample_end", "sample", ""),
    ("sched_send", "send", "BatchTokenIDOut"),
    ("detok_recv", "recv", "BatchTokenIDOut"),
    ("detok_send", "send", "BatchRequestOutput"),
    ("front_recv", "recv", "BatchRequestOutput"),
    ("handler_out", "handler_out", ""),
]


def load_events(trace_dir: str) -> List[Event]:
    events = []
    for path in glob.glob(os.path.join(trace_dir, "*.log")):
        with open(path) as f:
            for line in f:
                t, pid, tag, *rest = line.rstrip("\n").split(" ", 3)
                events.append((float(t), pid, tag, rest[0] if rest else ""))
    events.sort()
    return events


def requests(events: List[Event]) -> List[Tuple[Dict[str, str], float, float, List[Event]]]:
    """(client fields, start, ttft in s, events inside [start, start + ttft]) per client request."""
    out = []
    for _, _, tag, detail in events:
        if tag != "client":
            continue
        fields = dict(kv.split("=", 1) for kv in detail.split())
        start, ttft = float(fields["start"]), float(fields["ttft_ms"]) / 1e3
        inside = [e for e in events if start <= e[0] <= start + ttft + 1e-4 and e[2] != "client"]
        out.append((fields, start, ttft, inside))
    return out


def hops(start: float, ttft: float, inside: List[Event]) -> Dict[str, float]:
    """ms from each found mark to the next, starting at the client's start."""
    found: Dict[str, float] = {}
    i = 0
    for name, tag, prefix in MARKS:
        for j in range(i, len(inside)):
            t, _, etag, detail = inside[j]
            if etag == tag and detail.startswith(prefix):
                found[name] = t
                i = j + 1
                break
    found["client_first"] = start + ttft
    out, prev = {}, start
    for name in [m[0] for m in MARKS] + ["client_first"]:
        if name in found:
            out[name] = (found[name] - prev) * 1e3
            prev = found[name]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir")
    parser.add_argument("--timeline", type=int, default=0, help="print the raw events of the last N requests")
    parser.add_argument("--skip", type=int, default=2, help="leave the first K requests out of the medians")
    args = parser.parse_args()
    reqs = requests(load_events(args.trace_dir))
    for fields, start, ttft, inside in reqs[len(reqs) - args.timeline:] if args.timeline else []:
        print(f"--- ttft {ttft * 1e3:.2f} ms, cached tokens {fields['cached']}")
        for t, pid, tag, detail in inside:
            print(f"  +{(t - start) * 1e3:8.3f} ms  pid {pid:>7} {tag:<20} {detail}")
    groups: Dict[str, list] = {}
    for k, (fields, start, ttft, inside) in enumerate(reqs):
        if k >= args.skip:
            groups.setdefault("cached" if int(fields["cached"]) > 0 else "uncached", []).append(
                (ttft * 1e3, hops(start, ttft, inside)))
    for group, items in groups.items():
        print(f"=== {group}: {len(items)} requests, median TTFT {statistics.median(t for t, _ in items):.3f} ms; "
              "median ms since the previous mark:")
        names = list(dict.fromkeys(n for _, h in items for n in h))
        for name in names:
            values = [h[name] for _, h in items if name in h]
            print(f"  {name:<14} {statistics.median(values):8.3f}  (n={len(values)})")


if __name__ == "__main__":
    main()

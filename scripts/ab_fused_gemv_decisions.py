"""bench_one_batch with the fused-or-separate GEMV decisions of one weight kind forced, to check the
measured decisions (``fused_gemv._fused_wins``) against the whole decode graph:

    python scripts/ab_fused_gemv_decisions.py KIND MODE -- <bench_one_batch args>

KIND: dense | w8a8. MODE: measured (as the dispatcher decides), all (every prologue fused),
none (only the prologue-less fused GEMV, e.g. W8A8's in-kernel per-token quantization),
prologues (the RMSNorm and SiLU-and-mul prologues), separate (never fused).
"""

from __future__ import annotations

import sys

MODES = ("measured", "all", "none", "prologues", "separate")


def forced_decision(mode: str, prologue: str) -> bool:
    """Whether MODE fuses a GEMV behind ``prologue`` ("none", "rmsnorm" or "silu_mul")."""
    if mode == "all":
        return True
    if mode == "none":
        return prologue == "none"
    if mode == "prologues":
        return prologue != "none"
    return False


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[3] != "--" or sys.argv[2] not in MODES:
        raise SystemExit(__doc__)
    from pymllm.layers.kernels import fused_gemv

    kind, mode = sys.argv[1], sys.argv[2]
    measured = fused_gemv._fused_wins

    def decision(prologue, weight_kind, *args):
        if weight_kind != kind or mode == "measured":
            return measured(prologue, weight_kind, *args)
        return forced_decision(mode, prologue)

    fused_gemv._fused_wins = decision
    from pymllm.bench_one_batch import main as bench_main

    sys.exit(bench_main(sys.argv[4:]))


if __name__ == "__main__":
    main()

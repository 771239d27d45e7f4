"""bench_one_batch with the kernel of W4A16's one-row GEMVs forced, to compare the one-row kernel
(``w4a16_gemv_one_row.cuh``) with the register kernel inside the whole decode graph:

    python scripts/ab_w4a16_one_row.py MODE -- <bench_one_batch args>

MODE: planned (as ``w4a16_gemv`` plans it: the one-row kernel, weights copied before the PDL
wait), late (the one-row kernel copying its weights after the wait), registers (the register
kernel with its own split plan, as before the one-row kernel), early_dependents / late_dependents
(the one-row kernel letting the next kernel launch at its start / after its k loop), unsplit (the
one-row kernel's planned blocks, K never split).
"""

from __future__ import annotations

import functools
import importlib
import sys

MODES = ("planned", "late", "registers", "early_dependents", "late_dependents", "unsplit")


def forced_arguments(mode: str, kwargs: dict) -> dict:
    """The keyword arguments of a ``w4a16_gemv`` call under MODE (the caller's explicit ones kept)."""
    forced = dict(kwargs)
    if mode == "registers":
        forced.setdefault("one_row_warps", 0)
    elif mode == "late":
        forced.setdefault("early_weights", False)
    elif mode == "early_dependents":
        forced.setdefault("early_dependents", True)
    elif mode == "late_dependents":
        forced.setdefault("early_dependents", False)
    elif mode == "unsplit":
        forced.setdefault("splits", 1)
    return forced


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--" or sys.argv[1] not in MODES:
        raise SystemExit(__doc__)
    mode = sys.argv[1]
    module = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemv")
    planned = module.w4a16_gemv

    @functools.wraps(planned)  # keeps the JIT handle (.kernel) that build_step reads
    def w4a16_gemv(*args, **kwargs):
        return planned(*args, **forced_arguments(mode, kwargs))

    # pymllm imports the function from the module at each call site, so this reaches every call.
    module.w4a16_gemv = w4a16_gemv
    from pymllm.bench_one_batch import main as bench_main

    sys.exit(bench_main(sys.argv[3:]))


if __name__ == "__main__":
    main()

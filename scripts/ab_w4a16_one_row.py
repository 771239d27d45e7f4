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

# The keyword arguments each mode forces on every w4a16_gemv call.
FORCED = {
    "planned": {},
    "late": {"early_weights": False},
    "registers": {"one_row_warps": 0},
    "early_dependents": {"early_dependents": True},
    "late_dependents": {"early_dependents": False},
    "unsplit": {"splits": 1},
}
MODES = tuple(FORCED)


def forced_arguments(mode: str, kwargs: dict) -> dict:
    """The keyword arguments of a ``w4a16_gemv`` call under MODE (the caller's explicit ones kept)."""
    return {**FORCED[mode], **kwargs}


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

"""bench_one_batch with some one-row decode-matmul plans forced, to sweep them inside the whole
decode graph (runs T134-T136 in docs/perf):

    python scripts/ab_forced_plans.py [--gemv KIND:N:K:TILING] [--w4a16 N:K:WARPS:SPLITS[:TILE_N]] ... -- <bench_one_batch args>

--gemv: the one-row GEMV of ``gemv_dispatch`` for (KIND, N, K), e.g. ``w8a8:6144:4096:4``, runs the
compiled tiling TILING (rows per warp + 10 x split-K, as ``gemv_tiling`` names them) whatever its
measurement chose. --w4a16: the one-row W4A16 kernel of an [K/8, N] weight runs blocks of WARPS
warps in SPLITS K splits on tiles of TILE_N columns (64 when left out; 32: narrow tiles) instead
of ``plan_one_row``'s plan. Both may repeat. At exit the measured
GEMV decisions (forced ones included) go to stderr, one line each.
"""

from __future__ import annotations

import atexit
import importlib
import sys
from typing import Dict, List, Tuple

GemvKey = Tuple[str, int, int]  # (kind, N, K)
OneRowKey = Tuple[int, int]  # (N, K)


def parse(args: List[str]) -> Tuple[Dict[GemvKey, int], Dict[OneRowKey, Tuple[int, ...]], List[str]]:
    """(forced GEMV tilings, forced one-row W4A16 plans, bench_one_batch's arguments)."""
    if "--" not in args:
        raise SystemExit(__doc__)
    split = args.index("--")
    own, rest = args[:split], args[split + 1:]
    if len(own) % 2:
        raise SystemExit(__doc__)
    gemv: Dict[GemvKey, int] = {}
    one_row: Dict[OneRowKey, Tuple[int, ...]] = {}
    for flag, value in zip(own[::2], own[1::2]):
        fields = value.split(":")
        try:
            if flag == "--gemv" and len(fields) == 4:
                gemv[(fields[0], int(fields[1]), int(fields[2]))] = int(fields[3])
            elif flag == "--w4a16" and len(fields) in (4, 5):
                n, k, *plan = (int(f) for f in fields)
                one_row[(n, k)] = tuple(plan) if len(plan) == 3 else (*plan, 64)
            else:
                raise ValueError(value)
        except ValueError:
            raise SystemExit(f"bad {flag} {value!r}\n\n{__doc__}") from None
    return gemv, one_row, rest


def force_gemv_tilings(forced: Dict[GemvKey, int]) -> None:
    """One-row decisions of the keys in ``forced`` become the GEMV in the given tiling."""
    from pymllm.layers.kernels import gemv_dispatch as gd

    measured = gd.GemvChooser.use_gemv

    def use_gemv(self, key, weight, make_calls, labels=("GEMV", "GEMM"), tilings=()):
        choice = measured(self, key, weight, make_calls, labels, tilings)
        tiling = forced.get((key[0], key[3], key[4]))
        if tiling is None or key[5] != 1:
            return choice
        self.choices[key], self.tilings[key] = True, tiling
        return True

    gd.GemvChooser.use_gemv = use_gemv


def force_one_row_plans(forced: Dict[OneRowKey, Tuple[int, ...]]) -> None:
    """plan_one_row returns the forced plan for the (N, K) in ``forced``."""
    module = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemv")
    planned = module.plan_one_row

    def plan(n: int, k: int, *args):
        return module.OneRowPlan(*forced[(n, k)]) if (n, k) in forced else planned(n, k, *args)

    module.plan_one_row = plan
    module._auto_one_row.cache_clear()


def report_decisions() -> None:
    from pymllm.layers.kernels.gemv_dispatch import CHOOSER

    for key, choice in CHOOSER.choices.items():
        print(f"decision {key[0]} N={key[3]} K={key[4]} rows={key[5]}: {'gemv' if choice else 'gemm'} "
              f"tiling {CHOOSER.tilings.get(key, 0)}", file=sys.stderr)


def main() -> None:
    gemv, one_row, rest = parse(sys.argv[1:])
    if gemv:
        force_gemv_tilings(gemv)
    if one_row:
        force_one_row_plans(one_row)
    atexit.register(report_decisions)
    from pymllm.bench_one_batch import main as bench_main

    sys.exit(bench_main(rest))


if __name__ == "__main__":
    main()

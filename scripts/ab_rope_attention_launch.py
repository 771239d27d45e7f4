"""bench_one_batch with the one-row decode graph's attention (rope fused) launched with other
settings, for the A/B runs behind ``triton_decode.ROPE_NUM_WARPS`` / ``ROPE_NUM_STAGES``:

    python scripts/ab_rope_attention_launch.py WARPS STAGES SPLITS BLOCK -- <bench_one_batch args>

SPLITS 0 keeps the wave model's split count (``num_splits_for``). The settings override those of
every decode_attention call in the process (the Triton graph decode of every batch size, the
one-row graph's included); compare processes of one machine, alternating.
"""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) < 6 or sys.argv[5] != "--":
        raise SystemExit(__doc__)
    from pymllm.layers.attention import triton_decode as td

    warps, stages, splits, block = (int(a) for a in sys.argv[1:5])
    original = td.decode_attention

    def with_settings(*args, **kwargs):
        kwargs.update(num_warps=warps, num_stages=stages, block=block)
        return original(*args, **kwargs)

    td.decode_attention = with_settings
    if splits > 0:
        td.num_splits_for = lambda *args, **kwargs: splits
    from pymllm.bench_one_batch import main as bench_main

    sys.exit(bench_main(sys.argv[6:]))


if __name__ == "__main__":
    main()

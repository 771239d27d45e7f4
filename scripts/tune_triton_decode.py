"""Sweep the Triton decode kernel's launch settings (splits, KV block, warps, stages) at the batch
sizes where the graph runner chooses between it and FlashInfer's decode.

    python scripts/tune_triton_decode.py [--heads 32/8] [--out rows.jsonl]

Each case times, like scripts/bench_decode_attention.py, a graph of 20 calls on 20 layers' K/V
buffers (so K/V come from DRAM), for every setting, next to FlashInfer's tensor-core and CUDA-core
decode and the host time of FlashInfer's plan(), which a FlashInfer graph replay needs first and
the Triton kernel does not. Prints the best Triton setting per case and the time of the current
defaults (BLOCK_N, NUM_WARPS, NUM_STAGES, num_splits_for).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from scripts.bench_decode_attention import (
    _buffers,
    append_rows,
    kv_bytes,
    page_table,
    time_flashinfer,
    time_triton_calls,
)


def main() -> None:
    from pymllm.layers.attention.triton_decode import BLOCK_N, NUM_STAGES, NUM_WARPS, num_splits_for

    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", default="32/8", help="query/KV heads")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 24, 32, 48, 64, 96, 128])
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="split counts to try (powers of two; small batches need more)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    num_qo, num_kv = map(int, args.heads.split("/"))
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    settings = [(sp, bl, w, st) for sp, bl, w, st in itertools.product(args.splits, (32, 64), (4, 8), (2, 3))
                if not (bl == 32 and w == 8)]
    rows = []
    for bs, kv_len in itertools.product(args.batch_sizes, args.kv_lens):
        if kv_bytes(bs, kv_len, num_kv) * 20 > 60 << 30:  # 20 layers of K/V must fit
            continue
        q, kv = _buffers(num_qo, num_kv, bs, kv_len, device)
        table = page_table(bs, kv_len, device)
        times = {(sp, bl, w, st): time_triton_calls(q, kv, table, sp, block=bl, num_warps=w, num_stages=st)
                 for sp, bl, w, st in settings}
        del q, kv
        torch.cuda.empty_cache()
        tc, plan_tc = time_flashinfer(num_qo, num_kv, bs, kv_len, True)
        cc, plan_cc = time_flashinfer(num_qo, num_kv, bs, kv_len, False)
        default = (num_splits_for(bs, num_kv, sms), BLOCK_N, NUM_WARPS, NUM_STAGES)
        best = min(times, key=times.get)
        row = dict(bench="tune_triton_decode", num_qo_heads=num_qo, num_kv_heads=num_kv, batch_size=bs, kv_len=kv_len,
                   kv_bytes=kv_bytes(bs, kv_len, num_kv), default=default, default_us=times.get(default), best=best, best_us=times[best],
                   flashinfer_tc_us=tc, flashinfer_cc_us=cc, plan_tc_host_us=plan_tc, plan_cc_host_us=plan_cc,
                   all_us={"/".join(map(str, s)): round(t, 2) for s, t in times.items()},
                   device=torch.cuda.get_device_name(), command="python scripts/tune_triton_decode.py")
        rows.append(row)
        print(f"bs {bs:3d} kv {kv_len:5d}: triton default {default} {times.get(default, float('nan')):7.1f} us, "
              f"best {best} {times[best]:7.1f} us | flashinfer tc {tc:7.1f} cc {cc:7.1f} us, plan host {plan_tc:5.0f} us",
              flush=True)
        torch.cuda.empty_cache()
    append_rows(args.out, rows)


if __name__ == "__main__":
    main()

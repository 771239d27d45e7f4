"""The q/k-norm-rope + KV store inside the Triton decode attention, against the separate kernel,
as a one-row decode graph runs them.

    python scripts/bench_decode_rope.py [--kv-lens 1024 2048] [--sweep] [--out rows.jsonl]

Qwen3-8B heads (32 q / 8 kv, head_dim 128), bf16, batch 1. Each of 36 layers runs the qkv GEMV,
then either q/k-norm-rope (with its KV write) and decode attention or the fused attention, then
the o GEMV, all in one CUDA graph (PDL on where the GPU has it), on the layer's own K/V buffers;
reported: microseconds per layer for both forms and for the two GEMVs alone. ``--sweep`` also
times the fused kernel's launch settings (splits / KV block / warps / stages).
"""

from __future__ import annotations

import argparse
import json
import types

import torch

LAYERS, HQ, HK, D, HIDDEN = 36, 32, 8, 128, 4096


def _layers(kv_len: int, device) -> list:
    bf = torch.bfloat16
    slots = kv_len + 8
    return [dict(wqkv=torch.randn((HQ + 2 * HK) * D, HIDDEN, dtype=bf, device=device) * 0.02,
                 wo=torch.randn(HIDDEN, HQ * D, dtype=bf, device=device) * 0.02,
                 k=torch.randn(slots, HK, D, dtype=bf, device=device),
                 v=torch.randn(slots, HK, D, dtype=bf, device=device)) for _ in range(LAYERS)]


def main() -> None:
    import mllm_kernel

    from pymllm.layers.attention.decode_rope import DecodeRope
    from pymllm.layers.attention.triton_decode import (
        BLOCK_N, NUM_STAGES, NUM_WARPS, arrival_counters, decode_attention, num_splits_for,
    )
    from pymllm.layers.kernels.gemv_dispatch import graph_seconds_per_call
    from pymllm.layers.kernels.qk_norm_rope_triton import qk_norm_rope
    from pymllm.layers.rotary_embedding import RotaryEmbedding

    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-lens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    rope = RotaryEmbedding(D, 40960, types.SimpleNamespace(rope_theta=1e6, rope_scaling=None)).to(dev)
    q_w = torch.ones(D, dtype=torch.bfloat16, device=dev)
    k_w = torch.ones(D, dtype=torch.bfloat16, device=dev)
    x = torch.randn(1, HIDDEN, dtype=torch.bfloat16, device=dev)
    req = torch.zeros(1, dtype=torch.int64, device=dev)
    counters = arrival_counters(1, HK, dev)
    default_splits = num_splits_for(1, HK, torch.cuda.get_device_properties(dev).multi_processor_count)
    rows = []
    for n in args.kv_lens:
        layers = _layers(n, dev)
        r2t = torch.arange(1, n + 1, dtype=torch.int32, device=dev).view(1, n)
        lens = torch.tensor([n], device=dev)
        pos, loc = lens - 1, torch.tensor([n], dtype=torch.int64, device=dev)

        def layer(weights, fused, splits=default_splits, block=BLOCK_N, warps=NUM_WARPS, stages=NUM_STAGES):
            qkv = mllm_kernel.gemv(x, weights["wqkv"])
            q = qkv[:, : HQ * D].view(1, HQ, D)
            k = qkv[:, HQ * D : (HQ + HK) * D].view(1, HK, D)
            v = qkv[:, (HQ + HK) * D :].view(1, HK, D)
            launch = dict(counters=counters, block=block, num_warps=warps, num_stages=stages)
            if fused:
                spec = DecodeRope(k, v, pos, rope.cos_cached, rope.sin_cached, q_w, k_w, 1e-6, loc)
                o = decode_attention(q, weights["k"], weights["v"], r2t, req, lens, D**-0.5, splits, rope=spec,
                                     kv_settled=True, **launch)
            else:
                q, _ = qk_norm_rope(q, k, pos, rope.cos_cached, rope.sin_cached, q_w, k_w, 1e-6,
                                    v=v, k_cache=weights["k"], v_cache=weights["v"], out_cache_loc=loc)
                o = decode_attention(q, weights["k"], weights["v"], r2t, req, lens, D**-0.5, splits, **launch)
            return mllm_kernel.gemv(o.view(1, HQ * D), weights["wo"])

        def per_layer_us(**kw) -> float:
            return graph_seconds_per_call([lambda w=w: layer(w, **kw) for w in layers]) * 1e6

        # Alternate the two forms twice and keep each one's best.
        times = {False: [], True: []}
        for _ in range(2):
            for fused in (False, True):
                times[fused].append(per_layer_us(fused=fused))
        gemvs = graph_seconds_per_call(
            [lambda w=w: mllm_kernel.gemv(mllm_kernel.gemv(x, w["wqkv"])[:, : HQ * D], w["wo"]) for w in layers]
        ) * 1e6
        row = dict(bench="decode_rope", kv_len=n, separate_us=min(times[False]), fused_us=min(times[True]),
                   gemvs_alone_us=gemvs, splits=default_splits)
        print(f"kv {n}: us per layer separate {row['separate_us']:.2f} fused {row['fused_us']:.2f} "
              f"GEMVs alone {gemvs:.2f}", flush=True)
        if args.sweep:
            sweep = {}
            for splits in (8, 16, 32):
                for block in (32, 64):
                    for warps in (1, 2, 4, 8):
                        for stages in (1, 2, 3):
                            sweep[f"{splits}/{block}/{warps}/{stages}"] = round(
                                per_layer_us(fused=True, splits=splits, block=block, warps=warps, stages=stages), 2)
            best = min(sweep, key=sweep.get)
            row["sweep_us"] = sweep
            print(f"kv {n}: best fused setting {best} = {sweep[best]:.2f} us "
                  f"(splits/block/warps/stages; default {default_splits}/{BLOCK_N}/{NUM_WARPS}/{NUM_STAGES})")
        rows.append(row)
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(dict(row, device=torch.cuda.get_device_name(dev))) + "\n")


if __name__ == "__main__":
    main()

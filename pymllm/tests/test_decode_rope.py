"""Decode attention with the q/k norms, rope and KV store inside (decode_attention(rope=...)).

Oracles: the PyTorch reference ops (RMSNorm, rotary) followed by a float64 attention over the
cache they fill, and the separate kernels (q/k-norm-rope with its KV write, then plain decode
attention). On CPU the kernel runs under Triton's interpreter (a child process: TRITON_INTERPRET
is read when a kernel is defined); the GPU tests (marked gpu) run it for real, also in a CUDA
graph. The model-level check is test_triton_graph_decode's fused-rope graph path.
"""

from __future__ import annotations

import types

import pytest
import torch

from pymllm.engine.forward_batch import ForwardMode
from pymllm.layers.attention import flashinfer_backend as fib
from pymllm.layers.attention.base_backend import AttentionBackend
from pymllm.layers.attention.decode_rope import DecodeRope, decode_rope, rope_kernel_args
from pymllm.layers.fused_ops import KVCacheWrite
from pymllm.layers.layernorm import RMSNorm
from pymllm.layers.radix_attention import RadixAttention
from pymllm.layers.rotary_embedding import RotaryEmbedding
from pymllm.tests.helpers import assert_passes_under_triton_interpreter
from pymllm.tests.test_triton_decode import make_case, reference


def _rope(head_dim: int, max_position: int = 4096) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, types.SimpleNamespace(rope_theta=10000.0, rope_scaling=None))


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def make_rope_case(hq, hkv, d, lens, dtype, device, with_norm, loc_dtype, seed=0):
    """A decode step whose new tokens' slots are poisoned (NaN) in the pool: the raw q, k, v of
    those tokens, the DecodeRope, and the reference q / k after norm and rope."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    q_raw, k_buf, v_buf, r2t, req_idx, seq_lens = make_case(batch, hq, hkv, d, lens, dtype, device, seed=seed)
    # q, k, v as strided views of one fused QKV row, as the model splits it.
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, generator=gen).to(dtype=dtype, device=device)
    q_raw = qkv[:, : hq * d].view(batch, hq, d)
    k_raw = qkv[:, hq * d : (hq + hkv) * d].view(batch, hkv, d)
    v_new = qkv[:, (hq + hkv) * d :].view(batch, hkv, d)
    loc = torch.stack([r2t[req_idx[b], n - 1] for b, n in enumerate(lens)]).to(loc_dtype)
    positions = (seq_lens - 1).to(torch.int64)
    rope = _rope(d).to(device)
    norms = (None, None)
    if with_norm:
        norms = tuple(RMSNorm(d).to(dtype=dtype, device=device) for _ in range(2))
        for n in norms:
            n.weight.data = (1 + 0.2 * torch.randn(d, generator=gen)).to(dtype=dtype, device=device)
    from pymllm.layers import fused_ops

    ref_q, ref_k = fused_ops._qk_norm_rope_reference(q_raw, k_raw, positions, rope, *norms)
    k_buf[loc.long()] = float("nan")
    v_buf[loc.long()] = float("nan")
    spec = DecodeRope(k_raw, v_new, positions, rope.cos_cached, rope.sin_cached,
                      norms[0].weight if with_norm else None, norms[1].weight if with_norm else None, 1e-6, loc)
    return (q_raw, k_buf, v_buf, r2t, req_idx, seq_lens), spec, ref_q, ref_k, rope, norms


def check_against_references(hq, hkv, d, lens, dtype, device, with_norm, loc_dtype, splits, window, tol):
    from pymllm.layers.attention.triton_decode import decode_attention
    from pymllm.layers.kernels.qk_norm_rope_triton import qk_norm_rope

    (q_raw, k_buf, v_buf, r2t, req_idx, seq_lens), spec, ref_q, ref_k, rope, norms = make_rope_case(
        hq, hkv, d, lens, dtype, device, with_norm, loc_dtype, seed=hq + d + len(lens))
    loc = spec.out_cache_loc.long()
    untouched = torch.ones(k_buf.shape[0], dtype=torch.bool, device=device)
    untouched[loc] = False
    k_before, v_before = k_buf.clone(), v_buf.clone()
    scale = d**-0.5
    # kv_settled: no kernel right before this call writes the rows of the cached tokens.
    got = decode_attention(q_raw, k_buf, v_buf, r2t, req_idx, seq_lens, scale, splits, window,
                           out=torch.full_like(q_raw, float("nan")), rope=spec, kv_settled=True)
    # Without the preload (the default for eager callers) the same attention, from the loop alone.
    k_plain, v_plain = k_before.clone(), v_before.clone()
    plain = decode_attention(q_raw, k_plain, v_plain, r2t, req_idx, seq_lens, scale, splits, window, rope=spec)
    torch.testing.assert_close(plain, got, rtol=tol, atol=tol)
    # The pool: the new rows hold k after norm + rope and v as given; nothing else changed.
    assert torch.equal(_bits(v_buf[loc]), _bits(spec.v))
    torch.testing.assert_close(k_buf[loc], ref_k, rtol=tol, atol=tol)
    assert torch.equal(_bits(k_buf[untouched]), _bits(k_before[untouched]))
    assert torch.equal(_bits(v_buf[untouched]), _bits(v_before[untouched]))
    # The output: float64 attention of the reference q over the cache the references fill.
    ref_k_buf, ref_v_buf = k_before.clone(), v_before.clone()
    ref_k_buf[loc], ref_v_buf[loc] = ref_k, spec.v
    want = reference(ref_q.cpu(), ref_k_buf.cpu(), ref_v_buf.cpu(), r2t.cpu(), req_idx.cpu(), seq_lens.cpu(),
                     scale, window)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)
    # The separate kernels on the same inputs: q/k-norm-rope storing K/V, then attention.
    k_sep, v_sep = k_before.clone(), v_before.clone()
    q_sep, _ = qk_norm_rope(q_raw, spec.k, spec.positions, rope.cos_cached, rope.sin_cached,
                            spec.q_weight, spec.k_weight, spec.eps, v=spec.v, k_cache=k_sep, v_cache=v_sep,
                            out_cache_loc=spec.out_cache_loc)
    separate = decode_attention(q_sep, k_sep, v_sep, r2t, req_idx, seq_lens, scale, splits, window)
    torch.testing.assert_close(got, separate, rtol=tol, atol=tol)


def interpreter_checks() -> None:
    # GQA groups 4, 3 (padded rows) and 1; lengths 1 to past a split; more splits than tokens;
    # a window; with and without the q/k norms; both slot dtypes. float16 and float32: the
    # interpreter's tl.dot misreads bfloat16 (see test_triton_decode).
    for dtype, tol in ((torch.float16, 2e-3), (torch.float32, 1e-4)):
        for hq, hkv, d in ((8, 2, 16), (6, 2, 32), (2, 2, 16)):
            for with_norm, loc_dtype in ((True, torch.int64), (False, torch.int32)):
                for splits, window in ((1, -1), (4, -1), (16, -1), (4, 9)):
                    check_against_references(hq, hkv, d, [1, 37, 70], dtype, "cpu", with_norm, loc_dtype,
                                             splits, window, tol)
    # Slices longer than the tile preloaded before the wait (PRELOAD_BLOCKS x BLOCK = 128 tokens):
    # the loop goes on after it, with a partial last block.
    for splits in (1, 2):
        check_against_references(8, 2, 16, [150, 300], torch.float16, "cpu", True, torch.int64, splits, -1, 2e-3)
    print("interpreter checks passed")


def test_kernel_under_interpreter() -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_decode_rope", "interpreter_checks",
                                           printed="interpreter checks passed")


def test_argument_errors() -> None:
    from pymllm.layers.attention.triton_decode import decode_attention

    (q, k_buf, v_buf, r2t, req_idx, seq_lens), spec, *_ = make_rope_case(
        4, 2, 16, [3, 9], torch.float16, "cpu", True, torch.int64)
    bad = {
        "rope.k must be": spec._replace(k=spec.k[:1]),
        "rope.v must have the pool's dtype": spec._replace(v=spec.v.float()),
        "rope.cos_cache must be": spec._replace(cos_cache=spec.cos_cache.half()),
        "both norm weights or neither": spec._replace(k_weight=None),
        "rope.q_weight must be": spec._replace(q_weight=spec.q_weight[:8]),
        "rope.positions must be": spec._replace(positions=spec.positions.float()),
        "rope.out_cache_loc must be": spec._replace(out_cache_loc=spec.out_cache_loc[:1]),
    }
    for message, wrong in bad.items():
        with pytest.raises(ValueError, match=message):
            decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 2, rope=wrong)
    with pytest.raises(ValueError, match="q must have the pool's dtype"):
        decode_attention(q.float(), k_buf, v_buf, r2t, req_idx, seq_lens, 0.25, 2, rope=spec)


def test_kernel_args_order_and_placeholders() -> None:
    (q, *_), spec, *_ = make_rope_case(4, 2, 16, [3, 9], torch.float16, "cpu", False, torch.int32)
    args = rope_kernel_args(spec, q)
    ptrs = args.pointers
    assert ptrs[:2] == (spec.k, spec.v) and ptrs[2] is q and ptrs[3] is q  # no norm weights
    assert ptrs[4:8] == (spec.cos_cache, spec.sin_cache, spec.positions, spec.out_cache_loc)
    assert args.strides + (args.eps,) == (spec.k.stride(0), spec.k.stride(1), spec.v.stride(0), spec.v.stride(1),
                                          spec.eps)
    none = rope_kernel_args(None, q)
    assert tuple(none.pointers) + none.strides + (none.eps,) == (q,) * 8 + (0, 0, 0, 0, 0.0)


def test_decode_rope_follows_the_fused_ops_checks(monkeypatch) -> None:
    from pymllm.layers import fused_ops

    (q, k_buf, v_buf, *_), spec, _, _, rope, norms = make_rope_case(
        4, 2, 16, [3, 9], torch.float16, "cpu", True, torch.int64)
    write = KVCacheWrite(spec.v, k_buf, v_buf, spec.out_cache_loc)
    assert decode_rope(q, spec.k, spec.v, spec.positions, rope, *norms, write) is None  # CPU tensors
    monkeypatch.setattr(fused_ops, "can_use_fast_path", lambda *t: fused_ops._same_device_and_dtype(*t))
    got = decode_rope(q, spec.k, spec.v, spec.positions, rope, *norms, write)
    assert got is not None and got.q_weight is norms[0].weight and got.out_cache_loc is spec.out_cache_loc
    # An fp8-like pool of another dtype keeps the separate kernels, as their KV write would.
    other = KVCacheWrite(spec.v, k_buf.float(), v_buf.float(), spec.out_cache_loc)
    assert decode_rope(q, spec.k, spec.v, spec.positions, rope, *norms, other) is None


def test_who_fuses(monkeypatch) -> None:
    """Only the FlashInfer backend's one-row Triton graph decode fuses, and only in decode mode;
    the off switch turns it off."""
    layer = RadixAttention(4, 16, 0.25, 2, layer_id=0)
    fb = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, kv_pool=object(), attn_backend=None)
    assert layer.forward_rope(None, None, None, None, None, None, None, fb) is None  # extend: nothing runs
    assert AttentionBackend.forward_decode_rope(None, *([None] * 9)) is None
    backend = fib.FlashInferAttnBackend.__new__(fib.FlashInferAttnBackend)
    backend.forward_metadata = fib._ForwardMetadata("decode", {})
    assert backend.forward_decode_rope(*([None] * 9)) is None  # FlashInfer's decode kernel
    backend.forward_metadata = fib._ForwardMetadata("triton_decode", {}, num_splits=2, rope_in_attention=False)
    assert backend.forward_decode_rope(*([None] * 9)) is None
    # Only the one-row graph fuses (larger ones also replay extends whose rows read each other's
    # new K/V), and the off switch turns it off there too.
    assert fib.rope_in_attention_ok(1) and not fib.rope_in_attention_ok(2) and not fib.rope_in_attention_ok(32)
    monkeypatch.setattr(fib, "DECODE_ROPE_FUSION", False)
    assert not fib.rope_in_attention_ok(1)


def test_the_one_row_graph_launch(monkeypatch) -> None:
    """Where the backend fuses, it launches the kernel with the preload before the PDL wait
    (kv_settled: in a graph decode step no kernel of the step writes the cached tokens' rows) and
    the one-row launch settings, on its graph counters and the layer's pool."""
    from pymllm.layers.attention import decode_rope as dr
    from pymllm.layers.attention import triton_decode as td

    seen = {}

    def fake_attention(q, k_buf, v_buf, *args, **kwargs):
        seen.update(kwargs, args=args, k_buf=k_buf)
        return torch.zeros(q.shape[0], q.shape[1], q.shape[2])

    monkeypatch.setattr(td, "decode_attention", fake_attention)
    monkeypatch.setattr(dr, "decode_rope", lambda *a: "rope spec")
    backend = fib.FlashInferAttnBackend.__new__(fib.FlashInferAttnBackend)
    backend.forward_metadata = fib._ForwardMetadata("triton_decode", {}, num_splits=16, rope_in_attention=True)
    backend.req_to_token = torch.zeros(2, 8, dtype=torch.int32)
    backend._graph = types.SimpleNamespace(triton_counters=torch.zeros(8, dtype=torch.int32))
    pool = types.SimpleNamespace(get_kv_buffer=lambda layer_id: (f"k{layer_id}", f"v{layer_id}"))
    fb = types.SimpleNamespace(kv_pool=pool, out_cache_loc=None, req_pool_indices=None, seq_lens=None)
    layer = RadixAttention(4, 16, 0.25, 2, layer_id=3)
    out = backend.forward_decode_rope(torch.zeros(1, 4, 16), None, None, None, None, None, None, layer, fb)
    assert out.shape == (1, 64)
    assert seen["kv_settled"] is True and seen["rope"] == "rope spec" and seen["k_buf"] == "k3"
    assert seen["num_warps"] == td.ROPE_NUM_WARPS and seen["num_stages"] == td.ROPE_NUM_STAGES
    assert seen["counters"] is backend._graph.triton_counters and seen["args"][4] == 16  # the graph's split count


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv", [(32, 8), (16, 8)])
@pytest.mark.parametrize("lens", [[1], [1090], [5, 2048, 77, 300]])
@pytest.mark.parametrize("with_norm", [True, False], ids=["qwen3", "llama"])
def test_gpu_matches_references(hq, hkv, lens, with_norm) -> None:
    from pymllm.layers.attention.triton_decode import num_splits_for

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for splits, window in ((num_splits_for(len(lens), hkv, sms), -1), (1, 63)):
        check_against_references(hq, hkv, 128, lens, torch.bfloat16, "cuda", with_norm, torch.int64, splits, window,
                                 tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_settled", [False, True])
def test_gpu_graph_replays_follow_new_tokens(kv_settled) -> None:
    """Captured once (with PDL where the GPU has it), replayed with new lengths, positions, slots
    and q/k/v each time: output and pool rows as an eager call on the same inputs, bit for bit,
    with and without the K/V preload before the PDL wait (kv_settled)."""
    from pymllm.layers.attention.triton_decode import arrival_counters, decode_attention

    # Slots for the longest lengths of the loop: every position of every row has a slot of its
    # own, so no step's new slot is a cached slot of another row (as in the pool; with the
    # table's zero padding a new token could land in a slot the other rows read, an unordered
    # read in any launch, and one the preload reads before the store).
    (q, k_buf, v_buf, r2t, req_idx, seq_lens), spec, *_ = make_rope_case(
        32, 8, 128, [705, 705], torch.bfloat16, "cuda", True, torch.int64)
    counters = arrival_counters(2, 8, "cuda")
    out = torch.empty_like(q)
    gen = torch.Generator().manual_seed(1)

    def set_step(new_lens):
        seq_lens.copy_(torch.tensor(new_lens))
        spec.positions.copy_(seq_lens - 1)
        spec.out_cache_loc.copy_(torch.stack([r2t[req_idx[b], n - 1] for b, n in enumerate(new_lens)]))
        for t in (q, spec.k, spec.v):
            t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))

    def call(o):
        return decode_attention(q, k_buf, v_buf, r2t, req_idx, seq_lens, 128**-0.5, 16, out=o, counters=counters,
                                rope=spec, kv_settled=kv_settled)

    set_step([700, 40])
    call(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(out)
    for new_lens in ([700, 40], [1, 705], [512, 512]):
        set_step(new_lens)
        k_eager, v_eager = k_buf.clone(), v_buf.clone()
        torch.cuda.synchronize()  # the clones are the pool rows a kv_settled call may read before its wait
        want = decode_attention(q, k_eager, v_eager, r2t, req_idx, seq_lens, 128**-0.5, 16, rope=spec,
                                kv_settled=kv_settled)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert not counters.any()
        assert torch.equal(out, want)
        assert torch.equal(_bits(k_buf), _bits(k_eager)) and torch.equal(_bits(v_buf), _bits(v_eager))


def test_the_one_row_split_cap_comes_from_the_output_projection() -> None:
    """32 splits for the one-row graph's attention, unless the layer taking its output asks for
    fewer: the W4A16 scheme asks for 16 (its one-row GEMV runs faster behind them)."""
    from torch import nn

    from pymllm.layers.attention.triton_decode import ROPE_MAX_SPLITS
    from pymllm.layers.linear import UnquantizedLinearMethod
    from pymllm.quantization.compressed_tensors.linear_method import CompressedTensorsLinearMethod
    from pymllm.quantization.compressed_tensors.schemes.w8a8_int8 import W8A8Int8Scheme
    from pymllm.quantization.compressed_tensors.schemes.wna16 import W4A16_ATTENTION_SPLITS, WNA16Scheme

    def model_with(method):
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.o_proj = nn.Linear(2, 2)
        layer.self_attn.o_proj.quant_method = method
        layer.mlp = nn.Linear(2, 2)  # not o_proj: never asked
        layer.mlp.quant_method = CompressedTensorsLinearMethod(WNA16Scheme(128, True))
        model = nn.Module()
        model.layers = nn.ModuleList([layer])
        return model

    assert ROPE_MAX_SPLITS == 32 and W4A16_ATTENTION_SPLITS == 16
    assert fib.one_row_split_cap(model_with(UnquantizedLinearMethod())) == 32
    assert fib.one_row_split_cap(model_with(CompressedTensorsLinearMethod(W8A8Int8Scheme()))) == 32
    assert fib.one_row_split_cap(model_with(CompressedTensorsLinearMethod(WNA16Scheme(128, True)))) == 16
    assert fib.one_row_split_cap(nn.Linear(2, 2)) == 32  # no quant methods at all

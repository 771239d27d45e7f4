"""qk_norm_rope with the KV-cache write fused in, and the save_kv_cache plumbing.

- CPU: the dispatcher's fallback (reference ops + index assignment) against KVPool.set_kv,
  the capability checks, and save_kv_cache=False in the backends;
- Triton's interpreter (TRITON_INTERPRET=1, in a child process: Triton reads it when a kernel
  is defined): the kernel's cache rows bit for bit against the separate store of its own
  outputs, and the tiny Qwen3 and Llama models with the fused path forced on CPU tensors
  against the default path.

The CUDA versions of these checks are in test_gpu_fast_path.py.
"""

from __future__ import annotations

import types

import pytest
import torch

from pymllm.tests.helpers import assert_passes_under_triton_interpreter
from pymllm.engine.forward_batch import ForwardBatch, ForwardMode
from pymllm.layers import fused_ops
from pymllm.layers.attention import flashinfer_backend as fib
from pymllm.layers.attention.torch_native_backend import TorchNativeAttnBackend
from pymllm.layers.fused_ops import KVCacheWrite
from pymllm.layers.kernels.kv_cache_ops import KVCacheOps
from pymllm.layers.layernorm import RMSNorm
from pymllm.layers.radix_attention import RadixAttention
from pymllm.layers.rotary_embedding import RotaryEmbedding
from pymllm.mem_cache.memory_pool import KVPool, ReqToTokenPool


def _rope(head_dim: int, max_position: int = 64) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, types.SimpleNamespace(rope_theta=10000.0, rope_scaling=None))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """Integer view: compares NaN poison and signed zeros bit for bit."""
    return x.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[x.element_size()])


def _qkv(tokens: int, hq: int, hk: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """q, k, v as strided views of one fused QKV output, like the model's split."""
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, generator=gen).to(dtype)
    q = qkv[:, : hq * d].reshape(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(tokens, hk, d)
    v = qkv[:, (hq + hk) * d :].reshape(tokens, hk, d)
    return qkv, q, k, v


# ---------------- CPU: fallback, capability, plumbing ----------------
@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_norm", [True, False], ids=["qwen3", "llama"])
def test_fallback_store_equals_set_kv(loc_dtype, with_norm):
    gen = torch.Generator().manual_seed(1)
    tokens, hq, hk, d = 5, 4, 2, 16
    qkv, q, k, v = _qkv(tokens, hq, hk, d, torch.float32, gen)
    qkv0 = qkv.clone()
    rope = _rope(d)
    norms = (RMSNorm(d), RMSNorm(d)) if with_norm else (None, None)
    pos = torch.tensor([0, 9, 3, 3, 63])
    loc = torch.tensor([7, 2, 12, 5, 1], dtype=loc_dtype)
    pool = KVPool(15, 1, hk, d, torch.float32, "cpu")
    ref_pool = KVPool(15, 1, hk, d, torch.float32, "cpu")
    for p in (pool, ref_pool):
        p.k_buffers[0].fill_(float("nan"))
        p.v_buffers[0].fill_(float("nan"))
    got_q, got_k = fused_ops.qk_norm_rope(q, k, pos, rope, *norms, KVCacheWrite(v, *pool.get_kv_buffer(0), loc))
    ref_q, ref_k = fused_ops.qk_norm_rope(q, k, pos, rope, *norms)
    ref_pool.set_kv(0, loc.long(), ref_k, v)
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    assert torch.equal(_bits(pool.k_buffers[0]), _bits(ref_pool.k_buffers[0]))
    assert torch.equal(_bits(pool.v_buffers[0]), _bits(ref_pool.v_buffers[0]))
    assert torch.equal(qkv, qkv0), "inputs must not be written"


def test_try_store_kv_leaves_the_store_to_attention_on_cpu():
    gen = torch.Generator().manual_seed(2)
    _, q, k, v = _qkv(3, 4, 2, 16, torch.bfloat16, gen)
    k_cache = torch.zeros(8, 2, 16, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    kv = KVCacheWrite(v, k_cache, v_cache, torch.tensor([1, 2, 3]))
    got_q, got_k, stored = fused_ops.qk_norm_rope_try_store_kv(q, k, torch.arange(3), _rope(16), None, None, kv)
    assert not stored
    assert not k_cache.any() and not v_cache.any()
    ref_q, ref_k = _rope(16)(torch.arange(3), q, k)
    assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    assert not fused_ops.qk_norm_rope_supported(q, k, torch.arange(3), _rope(16), None, None, kv)


def test_kv_write_capability(monkeypatch):
    # Pretend the device check passed to reach the layout checks.
    monkeypatch.setattr(fused_ops, "can_use_fast_path", lambda *t: True)
    gen = torch.Generator().manual_seed(3)
    _, q, k, v = _qkv(3, 4, 2, 16, torch.float32, gen)
    rope, pos = _rope(16), torch.arange(3)
    k_cache, v_cache = torch.zeros(8, 2, 16), torch.zeros(8, 2, 16)
    loc = torch.tensor([1, 2, 3])

    def ok(**kw) -> bool:
        args = dict(v=v, k_cache=k_cache, v_cache=v_cache, out_cache_loc=loc)
        args.update(kw)
        return fused_ops.qk_norm_rope_supported(q, k, pos, rope, None, None, KVCacheWrite(**args))

    assert ok()
    assert ok(out_cache_loc=loc.int())
    assert ok(k_cache=torch.zeros(8, 2, 2, 16)[:, 0])  # slot stride != H*D, rows still dense
    assert not ok(k_cache=k_cache.half(), v_cache=v_cache.half())  # pool dtype != activations (fp8 KV)
    assert not ok(v=v.half())
    assert not ok(k_cache=torch.zeros(8, 2, 32)[..., :16])  # heads not dense
    assert not ok(v_cache=torch.zeros(8, 16, 2).transpose(1, 2))
    assert not ok(k_cache=torch.zeros(8, 1, 16))  # head count differs
    assert not ok(v_cache=torch.zeros(9, 2, 16))  # k and v pools of different sizes
    assert not ok(v=v[:, :1])
    assert not ok(out_cache_loc=loc.float())
    assert not ok(out_cache_loc=torch.tensor([1, 2, 3, 4, 5, 6])[::2])  # not contiguous
    assert not ok(out_cache_loc=loc[:2])
    assert not ok(out_cache_loc=loc.view(1, 3))


def _decode_batch(kv_pool: KVPool, req_pool: ReqToTokenPool, lens, locs) -> ForwardBatch:
    for r, n in enumerate(lens):
        req_pool.req_to_token[r, :n] = 1 + 16 * r + torch.arange(n, dtype=torch.int32)
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=len(lens), input_ids=torch.zeros(len(lens), dtype=torch.int64),
        positions=torch.tensor([n - 1 for n in lens]), req_pool_indices=torch.arange(len(lens)),
        seq_lens=torch.tensor(lens, dtype=torch.int32), out_cache_loc=torch.tensor(locs), seq_lens_cpu=list(lens),
        req_to_token_pool=req_pool, kv_pool=kv_pool,
    )


@pytest.mark.parametrize("mode", [ForwardMode.DECODE, ForwardMode.EXTEND], ids=["decode", "extend"])
def test_torch_native_save_kv_cache_false_with_explicit_store_equals_default(mode):
    torch.manual_seed(0)
    hq, hk, d = 4, 2, 16
    layer = RadixAttention(hq, d, d**-0.5, hk, 0)
    lens = [5, 3]
    pools = [KVPool(40, 1, hk, d, torch.float32, "cpu") for _ in range(3)]
    pools[0].k_buffers[0].normal_()
    pools[0].v_buffers[0].normal_()
    for p in pools[1:]:
        p.k_buffers[0].copy_(pools[0].k_buffers[0])
        p.v_buffers[0].copy_(pools[0].v_buffers[0])
    req_pool = ReqToTokenPool(2, 16, "cpu")
    fbs = []
    for p in pools:
        if mode.is_decode():
            fb = _decode_batch(p, req_pool, lens, [5, 19])
        else:  # the whole sequences as one prefill (slots as in _decode_batch)
            fb = _decode_batch(p, req_pool, lens, [])
            fb.forward_mode = ForwardMode.EXTEND
            fb.out_cache_loc = torch.cat([1 + 16 * r + torch.arange(n) for r, n in enumerate(lens)])
            fb.extend_seq_lens_cpu, fb.extend_prefix_lens_cpu = list(lens), [0, 0]
        fb.attn_backend = TorchNativeAttnBackend()
        fbs.append(fb)
    tokens = fbs[0].out_cache_loc.shape[0]
    q, k, v = torch.randn(tokens, hq * d), torch.randn(tokens, hk * d), torch.randn(tokens, hk * d)
    ref = layer(q, k, v, fbs[0])
    pools[1].set_kv(0, fbs[1].out_cache_loc, k.view(-1, hk, d), v.view(-1, hk, d))
    got = layer(q, k, v, fbs[1], save_kv_cache=False)
    assert torch.equal(got, ref)
    assert torch.equal(pools[1].k_buffers[0], pools[0].k_buffers[0])
    assert torch.equal(pools[1].v_buffers[0], pools[0].v_buffers[0])
    before = pools[2].k_buffers[0].clone(), pools[2].v_buffers[0].clone()
    layer(q, k, v, fbs[2], save_kv_cache=False)
    assert torch.equal(pools[2].k_buffers[0], before[0]) and torch.equal(pools[2].v_buffers[0], before[1])


def test_flashinfer_store_respects_save_flag():
    backend = object.__new__(fib.FlashInferAttnBackend)  # _store needs only kv_ops
    backend.kv_ops = KVCacheOps(torch.device("cpu"), torch.float32)
    pool = KVPool(8, 1, 2, 16, torch.float32, "cpu")
    layer = RadixAttention(4, 16, 0.25, 2, 0)
    fb = _decode_batch(pool, ReqToTokenPool(1, 16, "cpu"), [3], [4])
    k, v = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    bufs = backend._store(k, v, layer, fb, save=False)
    assert bufs[0] is pool.k_buffers[0] and not pool.k_buffers[0].any() and not pool.v_buffers[0].any()
    backend._store(k, v, layer, fb)
    assert torch.equal(pool.k_buffers[0][4], k[0]) and torch.equal(pool.v_buffers[0][4], v[0])


# ---------------- Triton interpreter ----------------
def _ulps(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]


def kernel_checks() -> None:
    """The fused write against a separate store of the kernel's own outputs (run under the
    interpreter, see the test): bit for bit, with poisoned caches, GQA shapes, both index
    dtypes, with and without q/k norms; and the dispatcher taking the fused path."""
    from mllm_kernel import store_cache_reference

    from pymllm.layers.kernels import qk_norm_rope_triton

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tol = dict(rtol=4 * _ulps(dtype), atol=4 * _ulps(dtype))  # interpreter bf16 truncates
        for hq, hk, d in ((4, 2, 16), (6, 1, 24), (2, 2, 8)):
            tokens = 5
            qkv, q, k, v = _qkv(tokens, hq, hk, d, dtype, gen)
            qkv0 = qkv.clone()
            rope = _rope(d, 40)
            pos = torch.tensor([0, 39, 7, 7, 21])
            qw = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
            kw = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
            for weights in ((qw, kw), (None, None)):
                for loc_dtype in (torch.int32, torch.int64):
                    loc = torch.tensor([9, 1, 14, 0, 6], dtype=loc_dtype)
                    # Slot stride 2 * hk * d: rows of a larger buffer, dense within a slot.
                    k_cache = torch.full((16, 2, hk, d), float("nan"), dtype=dtype)[:, 1]
                    v_cache = torch.full((16, hk, d), float("nan"), dtype=dtype)
                    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
                    args = (q, k, pos, rope.cos_cached, rope.sin_cached, weights[0], weights[1], 1e-6)
                    plain_q, plain_k = qk_norm_rope_triton.qk_norm_rope(*args)
                    got_q, got_k = qk_norm_rope_triton.qk_norm_rope(
                        *args, v=v, k_cache=k_cache, v_cache=v_cache, out_cache_loc=loc
                    )
                    assert torch.equal(_bits(got_q), _bits(plain_q)) and torch.equal(_bits(got_k), _bits(plain_k))
                    store_cache_reference(plain_k, v, ref_k_cache, ref_v_cache, loc.long())
                    assert torch.equal(_bits(k_cache), _bits(ref_k_cache)), (dtype, hq, hk, d, loc_dtype)
                    assert torch.equal(_bits(v_cache), _bits(ref_v_cache)), (dtype, hq, hk, d, loc_dtype)
                    assert torch.equal(qkv, qkv0), "inputs must not be written"
                # The cache rows hold k after norm + rope: close to the PyTorch reference.
                norms = (None, None)
                if weights[0] is not None:
                    norms = (RMSNorm(d).to(dtype), RMSNorm(d).to(dtype))
                    norms[0].weight.data.copy_(qw)
                    norms[1].weight.data.copy_(kw)
                _, ref_k = fused_ops._qk_norm_rope_reference(q, k, pos, rope, *norms)
                torch.testing.assert_close(k_cache[loc.long()], ref_k, **tol)
    # The dispatcher's fused path on CPU tensors (device check bypassed).
    fused_ops.can_use_fast_path = lambda *t: fused_ops._same_device_and_dtype(*t)
    _, q, k, v = _qkv(3, 4, 2, 16, torch.float16, gen)
    pool = KVPool(8, 1, 2, 16, torch.float16, "cpu")
    kv = KVCacheWrite(v, *pool.get_kv_buffer(0), torch.tensor([3, 1, 5]))
    got_q, got_k, stored = fused_ops.qk_norm_rope_try_store_kv(q, k, torch.arange(3), _rope(16), None, None, kv)
    assert stored
    assert torch.equal(pool.k_buffers[0][kv.out_cache_loc], got_k)
    assert torch.equal(pool.v_buffers[0][kv.out_cache_loc], v)
    print("kernel checks passed")


def model_checks() -> None:
    """Tiny Qwen3 and Llama, greedy and step logits, with the fused path forced on CPU tensors
    (every fused op runs in the interpreter, in float32) against the default path."""
    from pymllm.layers.attention import torch_native_backend
    from pymllm.models import llama
    from pymllm.testing.tiny_models import tiny_model_dir
    from pymllm.tests.helpers import greedy, make_scheduler, run_requests

    prompts = [[5, 17, 300, 42, 7, 99, 12, 250, 61], [11, 12, 13], [7]]
    new_tokens = [6, 5, 4]
    default_check = fused_ops.can_use_fast_path
    calls = {"fused": 0, "backend_store": 0}
    try_store, backend_store = llama.qk_norm_rope_try_store_kv, torch_native_backend.TorchNativeAttnBackend._store

    def counting_try_store(*args, **kw):
        out = try_store(*args, **kw)
        calls["fused"] += out[2]
        return out

    def counting_store(*args, **kw):
        calls["backend_store"] += 1
        return backend_store(*args, **kw)

    llama.qk_norm_rope_try_store_kv = counting_try_store
    torch_native_backend.TorchNativeAttnBackend._store = counting_store

    def run(model_dir, forced: bool):
        fused_ops.can_use_fast_path = (lambda *t: fused_ops._same_device_and_dtype(*t)) if forced else default_check
        # Chunked prefill: later chunks extend a cached prefix that earlier fused writes filled.
        sched = make_scheduler(model_dir, max_total_tokens=256, max_prefill_tokens=4)
        steps, forward = [], sched.runner.forward

        def recording_forward(fb):
            steps.append(forward(fb))
            return steps[-1]

        sched.runner.forward = recording_forward
        reqs = run_requests(sched, prompts, [greedy(n, ignore_eos=True) for n in new_tokens])
        return [reqs[str(i)].output_ids for i in range(len(prompts))], steps

    for arch in ("qwen3", "llama"):
        model_dir = tiny_model_dir(arch)
        calls.update(fused=0, backend_store=0)
        ref_out, ref_steps = run(model_dir, forced=False)
        assert calls["fused"] == 0 and calls["backend_store"] > 0, calls
        calls.update(fused=0, backend_store=0)
        got_out, got_steps = run(model_dir, forced=True)
        assert calls["backend_store"] == 0 and calls["fused"] > 0, calls
        assert got_out == ref_out, (arch, got_out, ref_out)
        assert len(got_steps) == len(ref_steps)
        for got, ref in zip(got_steps, ref_steps):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    print("model checks passed")


def _run_interpreted(function: str) -> None:
    assert_passes_under_triton_interpreter("pymllm.tests.test_fused_kv_write", function, printed="checks passed")


def test_fused_kv_write_kernel_under_the_interpreter():
    _run_interpreted("kernel_checks")


def test_models_with_the_fused_path_forced_under_the_interpreter():
    _run_interpreted("model_checks")

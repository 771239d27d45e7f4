"""Fused-op dispatchers on CPU, and the Triton kernels under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when a kernel is defined, so the interpreter checks run in a
child process that sets it before importing the kernels. The interpreter (triton 3.x) runs
the kernels on CPU tensors through numpy; its float32 -> bfloat16 conversion truncates where
CUDA rounds to nearest even, so bfloat16 is checked to a few units in the last place here and
bit-for-bit-ish on the GPU (test_gpu_fast_path.py); float16 and float32 are checked tightly.
"""

from __future__ import annotations

import types

import torch

from pymllm.tests.helpers import assert_passes_under_triton_interpreter
from pymllm.layers import fused_ops
from pymllm.layers.layernorm import RMSNorm, rms_norm_reference
from pymllm.layers.rotary_embedding import RotaryEmbedding, apply_rotary


def _rope(head_dim: int = 16, max_position: int = 32) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, max_position, types.SimpleNamespace(rope_theta=10000.0, rope_scaling=None))


def test_fast_paths_are_off_on_cpu():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    assert not fused_ops.can_use_fast_path(x)
    assert not fused_ops.rms_norm_supported(x, w)
    assert not fused_ops.rms_norm_supported(x, w, x.clone())
    rope = _rope()
    q = torch.randn(3, 4, 16, dtype=torch.bfloat16)
    assert not fused_ops.qk_norm_rope_supported(q, q[:, :2], torch.arange(3), rope, None, None)


def test_capability_rejects_layouts_the_kernels_do_not_take(monkeypatch):
    # Pretend the device check passed to reach the layout checks.
    monkeypatch.setattr(fused_ops, "can_use_fast_path", lambda *t: True)
    x = torch.randn(4, 64)
    w = torch.ones(64)
    assert fused_ops.rms_norm_supported(x, w)
    assert not fused_ops.rms_norm_supported(x.t(), torch.ones(4))  # not contiguous
    assert not fused_ops.rms_norm_supported(x, torch.ones(32))  # weight shape
    assert not fused_ops.rms_norm_supported(torch.randn(2, 32768), torch.ones(32768))  # row too long
    rope = _rope()
    qkv = torch.randn(3, 8 * 16)
    q, k = qkv[:, :64].view(3, 4, 16), qkv[:, 64:96].view(3, 2, 16)
    pos = torch.arange(3)
    assert fused_ops.qk_norm_rope_supported(q, k, pos, rope, None, None)
    assert not fused_ops.qk_norm_rope_supported(q, k, torch.arange(6).view(2, 3), rope, None, None)  # mrope
    assert not fused_ops.qk_norm_rope_supported(q.transpose(1, 2), k, pos, rope, None, None)
    assert not fused_ops.qk_norm_rope_supported(q, k, pos, rope, RMSNorm(16), None)
    assert not fused_ops.qk_norm_rope_supported(q, k, pos, rope, RMSNorm(16, 1e-6), RMSNorm(16, 1e-5))

    class Scaled(RotaryEmbedding):
        pass

    rope_config = types.SimpleNamespace(rope_theta=10000.0, rope_scaling=None)

    assert not fused_ops.qk_norm_rope_supported(q, k, pos, Scaled(16, 32, rope_config), None, None)


def test_dispatchers_fall_back_to_the_reference_on_cpu():
    torch.manual_seed(0)
    x, r, w = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), rtol=0, atol=0)
    normed, summed = fused_ops.fused_add_rms_norm(x, r, w, 1e-6)
    torch.testing.assert_close(summed, x + r, rtol=0, atol=0)
    torch.testing.assert_close(normed, rms_norm_reference(x + r, w, 1e-6), rtol=0, atol=0)
    g = torch.randn(3, 80)
    torch.testing.assert_close(fused_ops.silu_and_mul(g), torch.nn.functional.silu(g[:, :40]) * g[:, 40:])
    rope = _rope()
    q, k, pos = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.tensor([0, 5, 31])
    qn, kn = RMSNorm(16), RMSNorm(16)
    got_q, got_k = fused_ops.qk_norm_rope(q, k, pos, rope, qn, kn)
    ref_q, ref_k = rope(pos, qn(q), kn(k))
    torch.testing.assert_close(got_q, ref_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, ref_k, rtol=0, atol=0)


def _ulps(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]


def interpreter_checks() -> None:
    """Kernels vs references on CPU tensors; run with TRITON_INTERPRET=1 (see the test)."""
    from pymllm.layers.kernels import norm_act_triton, qk_norm_rope_triton

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # float16 rounds like CUDA here: exact. bfloat16: interpreter truncation, a few ulps.
        tol = dict(rtol=0, atol=0) if dtype == torch.float16 else dict(rtol=4 * _ulps(dtype), atol=4 * _ulps(dtype))

        def rnd(*shape):
            return torch.randn(*shape, generator=gen).to(dtype)

        # RMSNorm on a width that is not a power of two (masked tail), with poisoned outputs.
        x, r, w = rnd(6, 48), rnd(6, 48), (1 + 0.1 * torch.randn(48, generator=gen)).to(dtype)
        x0, r0 = x.clone(), r.clone()
        out = torch.full_like(x, float("nan"))
        got, none = norm_act_triton.rms_norm(x, w, 1e-6, out=out)
        assert none is None and got.data_ptr() == out.data_ptr()
        torch.testing.assert_close(got, rms_norm_reference(x, w, 1e-6), **tol)
        res_out = torch.full_like(x, float("nan"))
        normed, summed = norm_act_triton.rms_norm(x, w, 1e-6, residual=r, residual_out=res_out)
        torch.testing.assert_close(summed, x + r, **tol)
        torch.testing.assert_close(normed, rms_norm_reference(x + r, w, 1e-6), **tol)
        assert torch.equal(x, x0) and torch.equal(r, r0), "inputs must not be written"
        # SiLU-and-mul over more than one column block.
        g = rnd(3, 2 * 1100)
        out = torch.full((3, 1100), float("nan"), dtype=dtype)
        got = norm_act_triton.silu_and_mul(g, out=out)
        ref = torch.nn.functional.silu(g[:, :1100]) * g[:, 1100:]
        torch.testing.assert_close(got, ref, **tol)
        # q/k norm + rope on strided views of a fused QKV row, head_dim 24 (masked half of 12).
        tokens, hq, hk, d = 5, 3, 2, 24
        qkv = rnd(tokens, (hq + 2 * hk) * d)
        q = qkv[:, : hq * d].reshape(tokens, hq, d)
        k = qkv[:, hq * d : (hq + hk) * d].reshape(tokens, hk, d)
        qkv0 = qkv.clone()
        cos, sin = torch.randn(40, d // 2, generator=gen), torch.randn(40, d // 2, generator=gen)
        pos = torch.tensor([0, 39, 7, 7, 21])
        qw, kw = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype), (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
        c, s = cos[pos].to(dtype), sin[pos].to(dtype)
        # One token per program (decode) and tiles of 4 tokens with a ragged last tile (prefill).
        for weights, per_program in (((qw, kw), None), ((None, None), None), ((qw, kw), 4), ((None, None), 4)):
            q_out = torch.full((tokens, hq, d), float("nan"), dtype=dtype)
            k_out = torch.full((tokens, hk, d), float("nan"), dtype=dtype)
            got_q, got_k = qk_norm_rope_triton.qk_norm_rope(
                q, k, pos, cos, sin, weights[0], weights[1], 1e-6, q_out=q_out, k_out=k_out,
                tokens_per_program_override=per_program,
            )
            ref_q = q if weights[0] is None else rms_norm_reference(q, qw, 1e-6)
            ref_k = k if weights[1] is None else rms_norm_reference(k, kw, 1e-6)
            torch.testing.assert_close(got_q, apply_rotary(ref_q, c, s), **tol)
            torch.testing.assert_close(got_k, apply_rotary(ref_k, c, s), **tol)
        assert torch.equal(qkv, qkv0)
        # The KV-cache write from a tiled launch: rows at the given slots, the rest untouched.
        v = rnd(tokens, hk, d)
        k_cache = torch.full((12, hk, d), float("nan"), dtype=dtype)
        v_cache = torch.full((12, hk, d), float("nan"), dtype=dtype)
        loc = torch.tensor([3, 11, 0, 7, 5])
        _, got_k = qk_norm_rope_triton.qk_norm_rope(
            q, k, pos, cos, sin, qw, kw, 1e-6, v=v, k_cache=k_cache, v_cache=v_cache, out_cache_loc=loc,
            tokens_per_program_override=4,
        )
        assert torch.equal(k_cache[loc], got_k) and torch.equal(v_cache[loc], v)
        untouched = torch.ones(12, dtype=torch.bool)
        untouched[loc] = False
        assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()
    assert qk_norm_rope_triton.tokens_per_program(1) == 1 and qk_norm_rope_triton.tokens_per_program(2048) == 16
    print("interpreter checks passed")


def test_triton_kernels_under_the_interpreter():
    assert_passes_under_triton_interpreter("pymllm.tests.test_fused_ops", "interpreter_checks",
                                           printed="interpreter checks passed")

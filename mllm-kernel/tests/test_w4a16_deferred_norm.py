"""The deferred RMSNorm of w4a16_gemv (``w4a16_gemv_add_norm`` -> ``w4a16_gemv_normed``): the kernels
against their float64 PyTorch references on fresh random inputs into NaN-poisoned outputs (GPU,
marked gpu), and on CPU the identity the pair relies on, W norm(h) = (W (w * h)) / rms(h), with
the norm computed as pymllm's RMSNorm computes it."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_w4a16_gemv import QWEN3_8B, TOLERANCE, random_layer, relative_error

module = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemv")
refs = importlib.import_module("mllm_kernel.cuda.jit.w4a16_reference")
EPS = 1e-6


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """pymllm's / HF's RMSNorm: normalise in float32, round, multiply by the weight in h's dtype."""
    hf = h.float()
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def norm_inputs(n: int, dtype: torch.dtype, device: str, gen: torch.Generator):
    # A residual stream with a few large channels, as trained models have; a norm weight around 1.
    residual = torch.randn(1, n, generator=gen) * 2
    residual[0, torch.randint(0, n, (4,), generator=gen)] *= 40
    weight = 1 + 0.3 * torch.randn(n, generator=gen)
    return residual.to(dtype).to(device), weight.to(dtype).to(device)


# ---------------------------------------------------------------- CPU
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_references_compose_to_the_norm_then_the_gemv(dtype, gated):
    """The pair's references give the GEMV of RMSNorm(out + residual) up to the dtype's rounding."""
    gen = torch.Generator().manual_seed(3)
    # Producer [256 -> 200] (a partial last tile: 200 = 3 x 64 + 8), consumer [200 -> 136] channel-wise.
    n, k, group = 200, 256, 64
    qweight, scales, zeros = random_layer(n, k, group, False, dtype, "cpu")
    q2, s2, z2 = random_layer(136, n, n, True, dtype, "cpu")
    x = torch.randn(1, k, generator=gen).to(dtype)
    residual, weight = norm_inputs(n, dtype, "cpu", gen)

    scaled, h, sumsq = refs.w4a16_gemv_add_norm_reference(x, qweight, scales, zeros, group, residual, weight)
    assert sumsq.shape == (module.norm_tiles(n),) == (4,)
    torch.testing.assert_close(sumsq.double().sum(), (h.double() ** 2).sum(), rtol=1e-6, atol=0)
    want_h = (refs.w4a16_gemv_reference(x, qweight, scales, zeros, group).float() + residual.float()).to(dtype)
    assert torch.equal(h, want_h)
    assert torch.equal(scaled, (weight.float() * h.float()).to(dtype))

    got = refs.w4a16_gemv_normed_reference(scaled, q2, s2, z2, n, sumsq, EPS, gated=gated)
    want = refs.w4a16_gemv_reference(rms_norm(h, weight), q2, s2, z2, n)
    if gated:
        from mllm_kernel.cuda.jit.gemv_kernels import silu_mul_reference

        want = silu_mul_reference(want)
    # Two roundings of each input move (the norm's and the weight product's): a few ulps of the input.
    assert relative_error(got, want.double()) < 4 * TOLERANCE[dtype]


def test_norm_tiles():
    assert [module.norm_tiles(n) for n in (1, 64, 65, 4096, 8192)] == [1, 1, 2, 64, 128]
    assert [module.norm_tiles(n, 32) for n in (1, 32, 33, 4096)] == [1, 1, 2, 128]
    assert module.norm_tiles(8192) <= module.MAX_NORM_TILES < module.norm_tiles(8193)
    h = torch.arange(100, dtype=torch.float32).reshape(1, 100)
    for tile_n in (64, 32):
        sums = module.norm_tile_sums(h, tile_n)
        assert sums.shape == (module.norm_tiles(100, tile_n),)
        assert sums[0].item() == (h[0, :tile_n] ** 2).sum().item() and sums.sum().item() == (h**2).sum().item()


def test_add_norm_supported_is_the_producers_argument_check():
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    qweight, _, _ = random_layer(72, 64, 64, False, torch.bfloat16, "cpu")
    vector = torch.zeros(72, dtype=torch.bfloat16)
    assert module.add_norm_supported(x, qweight, vector.reshape(1, 72), vector)
    assert not module.add_norm_supported(torch.zeros(2, 64, dtype=torch.bfloat16), qweight, vector, vector)
    assert not module.add_norm_supported(x, qweight, vector.float(), vector)
    assert not module.add_norm_supported(x, qweight, vector, vector[:64])
    assert not module.add_norm_supported(x, qweight, vector, torch.zeros(72, 2, dtype=torch.bfloat16)[:, 0])


def test_wrappers_refuse_bad_norm_arguments():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    qweight, scales, _ = random_layer(64, 64, 64, False, torch.bfloat16, "cpu")
    vector = torch.zeros(64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one activation row"):
        module.w4a16_gemv_add_norm(x, qweight, scales, None, 64, vector, vector, validate=False)
    with pytest.raises(ValueError, match="residual must be a tensor of x's dtype"):
        module.w4a16_gemv_add_norm(x[:1], qweight, scales, None, 64, vector.float(), vector, validate=False)
    with pytest.raises(ValueError, match="norm_weight must be contiguous with 64 elements"):
        module.w4a16_gemv_add_norm(x[:1], qweight, scales, None, 64, vector, vector[:32], validate=False)
    with pytest.raises(ValueError, match="one activation row"):
        module.w4a16_gemv_normed(x, qweight, scales, None, 64, torch.zeros(1), EPS, validate=False)
    for sums in (torch.zeros(1, dtype=torch.float64), torch.zeros(0), torch.zeros(129)):
        with pytest.raises(ValueError, match="sumsq must be a contiguous float32 tensor of 1..128"):
            module.w4a16_gemv_normed(x[:1], qweight, scales, None, 64, sums, EPS, validate=False)
    with pytest.raises(ValueError, match="one-row kernel"):
        module.w4a16_gemv(x, qweight, scales, None, 64, validate=False, norm_in=(torch.zeros(1), EPS))
    with pytest.raises(ValueError, match="producer or its consumer, not both"):
        module.w4a16_gemv(x[:1], qweight, scales, None, 64, validate=False, norm_in=(torch.zeros(1), EPS),
                          norm_out=(vector, vector, vector, torch.zeros(1)))


# ---------------------------------------------------------------- GPU
def _producer(n, k, group, with_zeros, dtype, with_bias):
    gen = torch.Generator().manual_seed(n + k + group)
    qweight, scales, zeros = random_layer(n, k, group, with_zeros, dtype)
    x = torch.randn(1, k, generator=gen).to(dtype).cuda()
    bias = torch.randn(n, generator=gen).to(dtype).cuda() if with_bias else None
    residual, weight = norm_inputs(n, dtype, "cuda", gen)
    return x, qweight, scales, zeros, group, residual, weight, bias


@pytest.mark.gpu
@pytest.mark.parametrize("with_zeros, with_bias", [(False, False), (True, True)])
@pytest.mark.parametrize("n, k, splits", [(4096, 4096, None), (4096, 12288, None), (200, 256, 2), (36, 96, 1)])
@pytest.mark.parametrize("tile_n", [64, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_producer_matches_reference(dtype, tile_n, n, k, splits, with_zeros, with_bias):
    x, qweight, scales, zeros, group, residual, weight, bias = _producer(
        n, k, 32 if k % 64 else 64, with_zeros, dtype, with_bias)
    out = torch.full((1, n), float("nan"), dtype=dtype, device="cuda")
    h = torch.full((1, n), float("nan"), dtype=dtype, device="cuda")
    sumsq = torch.full((module.norm_tiles(n, tile_n),), float("nan"), device="cuda")
    module.w4a16_gemv(x, qweight, scales, zeros, group, bias, out=out, splits=splits, one_row_warps=16,
                      one_row_tile_n=tile_n, norm_out=(residual, weight, h, sumsq))
    want_scaled, want_h, want_sumsq = refs.w4a16_gemv_add_norm_reference(
        x, qweight, scales, zeros, group, residual, weight, bias, tile_n)
    # h and w * h are rounded from the GEMV's output: within one ulp of the reference's (whose own
    # output may round the other way), and the tile sums follow.
    assert relative_error(h, want_h.double()) < TOLERANCE[dtype]
    assert relative_error(out, want_scaled.double()) < 2 * TOLERANCE[dtype]
    assert torch.equal(out, (weight.float() * h.float()).to(dtype))  # exactly w * (its own h)
    torch.testing.assert_close(sumsq, module.norm_tile_sums(h, tile_n), rtol=1e-5, atol=0)  # the tile sums of its own h
    assert relative_error(sumsq, want_sumsq.double()) < 2 * TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("n, k, group, with_zeros", [(6144, 4096, 128, False), (24576, 4096, 32, True), (136, 200, 200, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_consumer_matches_reference(dtype, n, k, group, with_zeros, gated):
    gen = torch.Generator().manual_seed(n + k)
    qweight, scales, zeros = random_layer(n, k, group, with_zeros, dtype)
    residual, weight = norm_inputs(k, dtype, "cuda", gen)
    scaled = (weight.float() * residual.float()).to(dtype)
    sumsq = module.norm_tile_sums(residual)
    bias = torch.randn(n, generator=gen).to(dtype).cuda()
    got = module.w4a16_gemv_normed(scaled, qweight, scales, zeros, group, sumsq, EPS, bias, gated=gated)
    want = refs.w4a16_gemv_normed_reference(scaled, qweight, scales, zeros, group, sumsq, EPS, bias, gated=gated)
    assert got.shape == (1, n // 2 if gated else n)
    assert relative_error(got, want.double()) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chain_equals_the_norm_between_two_gemvs(dtype):
    """Qwen3-8B's o_proj -> post-attention norm -> gated gate/up, both ways, in a CUDA graph (PDL as
    the model runs it): within the dtype's rounding of the separate path, and deterministic."""
    from mllm_kernel.cuda.jit.gemv_kernels import silu_mul_reference

    gen = torch.Generator().manual_seed(11)
    (n_o, k_o), (n_gu, k_gu) = QWEN3_8B[1], QWEN3_8B[2]
    o_layer = random_layer(n_o, k_o, 128, False, dtype)
    gu_layer = random_layer(n_gu, k_gu, 128, False, dtype)
    x = torch.randn(1, k_o, generator=gen).to(dtype).cuda()
    residual, weight = norm_inputs(n_o, dtype, "cuda", gen)

    def deferred():
        scaled, h, sumsq = module.w4a16_gemv_add_norm(x, *o_layer, 128, residual, weight)
        return module.w4a16_gemv_normed(scaled, *gu_layer, 128, sumsq, EPS, gated=True), h

    eager, eager_h = deferred()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, captured_h = deferred()
    captured.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager) and torch.equal(captured_h, eager_h)

    out = module.w4a16_gemv(x, *o_layer, 128)
    h = (out.float() + residual.float()).to(dtype)
    separate = silu_mul_reference(refs.w4a16_gemv_reference(rms_norm(h, weight), *gu_layer, 128))
    assert torch.equal(eager_h, h)
    assert relative_error(eager, separate.double()) < 4 * TOLERANCE[dtype]

"""Extend on a cached prefix with the real FlashInfer: every strategy of ``flashinfer_extend``
against torch_native at the op level (marked gpu).

- GQA 2 and GQA 4 (the Qwen3-0.6B and Qwen3-8B head layouts), head_dim 128, bf16;
- a mixed batch (a 2,000-token prefix + 32 new tokens, a request with nothing cached, a short
  prefix + one token) and a batch where every request has a prefix;
- FlashInfer's log-sum-exp is base 2 (what the CPU stand-in in test_flashinfer_metadata.py
  and the cascade merge assume), for the FA3 ("auto" on SM90) and FA2 backends.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from pymllm.engine.forward_batch import ForwardBatch, ForwardMode
from pymllm.layers.attention.torch_native_backend import TorchNativeAttnBackend
from pymllm.layers.radix_attention import RadixAttention
from pymllm.mem_cache.memory_pool import KVPool, ReqToTokenPool

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
BF16 = torch.bfloat16
MAX_LEN = 2304  # tokens per request row


def _modules():
    pytest.importorskip("flashinfer")
    from pymllm.layers.attention import flashinfer_extend as fx
    from pymllm.layers.attention.flashinfer_backend import FlashInferAttnBackend

    return fx, FlashInferAttnBackend


class _Layer:
    """One attention layer over a pool where request r's token p lives in slot 1 + MAX_LEN * r + p."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int = 128):
        self.layer = RadixAttention(heads, head_dim, head_dim**-0.5, kv_heads, 0)
        self.kv_pool = KVPool(4 * MAX_LEN, 1, kv_heads, head_dim, BF16, CUDA)
        self.req_pool = ReqToTokenPool(4, MAX_LEN, CUDA)
        with torch.no_grad():
            for buf in (self.kv_pool.k_buffers[0], self.kv_pool.v_buffers[0]):
                buf.normal_()
        self.runner = types.SimpleNamespace(
            device=CUDA, dtype=BF16, kv_pool=self.kv_pool, req_to_token_pool=self.req_pool,
            model=torch.nn.ModuleList([self.layer]),
        )

    def batch(self, reqs, prefix, new) -> ForwardBatch:
        locs = []
        for r, p, n in zip(reqs, prefix, new):
            slots = 1 + MAX_LEN * r + torch.arange(p + n, device=CUDA)
            self.req_pool.req_to_token[r, : p + n] = slots.to(torch.int32)
            locs.append(slots[p:])
        seq_lens = [p + n for p, n in zip(prefix, new)]
        return ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=len(reqs),
            input_ids=torch.zeros(sum(new), dtype=torch.int64, device=CUDA),
            positions=torch.cat([torch.arange(p, p + n, device=CUDA) for p, n in zip(prefix, new)]),
            req_pool_indices=torch.tensor(reqs, device=CUDA),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=CUDA),
            out_cache_loc=torch.cat(locs), seq_lens_cpu=seq_lens,
            extend_seq_lens_cpu=list(new), extend_prefix_lens_cpu=list(prefix),
            extend_seq_lens=torch.tensor(new, dtype=torch.int32, device=CUDA),
            extend_prefix_lens=torch.tensor(prefix, dtype=torch.int32, device=CUDA),
            req_to_token_pool=self.req_pool, kv_pool=self.kv_pool,
        )

    def qkv(self, tokens: int):
        a = self.layer
        return (
            torch.randn(tokens, a.num_heads * a.head_dim, device=CUDA, dtype=BF16),
            torch.randn(tokens, a.num_kv_heads * a.head_dim, device=CUDA, dtype=BF16),
            torch.randn(tokens, a.num_kv_heads * a.head_dim, device=CUDA, dtype=BF16),
        )


@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 8)], ids=["gqa2", "gqa4"])
def test_every_extend_strategy_matches_torch_native(heads, kv_heads):
    fx, backend_cls = _modules()
    torch.manual_seed(heads)
    attn = _Layer(heads, kv_heads)
    native = TorchNativeAttnBackend()
    cases = [([0, 1, 2], [2000, 0, 37], [32, 17, 1]), ([0, 2], [2000, 40], [32, 5])]
    for strategy in fx.EXTEND_STRATEGIES:
        fi = backend_cls(attn.runner, extend_strategy=strategy)
        expected_kind = "cascade" if strategy.startswith("cascade") else "paged"
        for reqs, prefix, new in cases:
            fb = attn.batch(reqs, prefix, new)
            q, k, v = attn.qkv(sum(new))
            fi.init_forward_metadata(fb)
            assert fi.forward_metadata.kind == expected_kind
            got = fi.forward(q, k, v, attn.layer, fb)
            ref = native.forward(q, k, v, attn.layer, fb)
            assert torch.isfinite(got).all(), strategy
            torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2, msg=f"{strategy} {prefix}")
        del fi
        torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["auto", "fa2"])
def test_flashinfer_lse_is_base_2(backend):
    pytest.importorskip("flashinfer")
    import flashinfer

    torch.manual_seed(0)
    heads, kv_heads, d, n = 8, 2, 128, 50
    q = torch.randn(n, heads, d, device=CUDA, dtype=BF16)
    k = torch.randn(n, kv_heads, d, device=CUDA, dtype=BF16)
    v = torch.randn(n, kv_heads, d, device=CUDA, dtype=BF16)
    workspace = torch.zeros(128 << 20, dtype=torch.uint8, device=CUDA)
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=backend)
    indptr = torch.tensor([0, n], dtype=torch.int32)
    scale = d**-0.5
    wrapper.plan(indptr, indptr, heads, kv_heads, d, causal=False, sm_scale=scale, q_data_type=BF16, kv_data_type=BF16)
    _, lse = wrapper.run(q, k, v, return_lse=True)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(heads // kv_heads, dim=1)) * scale
    expected = (torch.logsumexp(scores, dim=-1) / math.log(2)).T
    assert lse.dtype == torch.float32 and lse.shape == (n, heads)
    torch.testing.assert_close(lse, expected, rtol=1e-2, atol=1e-2)

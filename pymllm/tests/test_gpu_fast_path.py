"""The GPU fast path against the PyTorch references, on a CUDA device (marked gpu).

- fused ops (Triton) vs their references, outputs poisoned with NaN beforehand; the q/k
  norm+rope kernel's KV-cache write bit for bit against the separate store, and a model run
  with the fused write against one without it (same logits, same KV pool);
- FlashInfer attention vs torch_native at the op level (ragged prefill, paged extend, eager
  decode, and decode captured in a CUDA graph and replayed on a padded batch) for the head
  layouts of Qwen3-0.6B (GQA 2, CUDA-core decode) and Qwen3-8B (GQA 4, tensor-core decode);
- a 0.6B-shaped dummy model: logits of FlashInfer vs torch_native;
- a tiny random model through the scheduler (batched, staggered, chunked prefill): FlashInfer
  with CUDA graphs vs torch_native, step by step, greedy tokens equal except at near-ties;
- ModelRunner: CUDA-graph replay of a padded batch (3 -> 4) equals the eager forward.

FlashInfer has no float32 attention, so everything runs in bfloat16 (one dtype and head_dim
128 throughout also keeps the JIT compile to the modules the benchmarks need anyway).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import List

import pytest
import torch

from pymllm.configs import GlobalConfig
from pymllm.engine.forward_batch import ForwardBatch, ForwardMode
from pymllm.engine.io_struct import TokenizedGenerateReq
from pymllm.executor.model_runner import ModelRunner, load_model_runner
from pymllm.layers import fused_ops
from pymllm.layers.attention.torch_native_backend import TorchNativeAttnBackend
from pymllm.layers.layernorm import RMSNorm, rms_norm_reference
from pymllm.layers.radix_attention import RadixAttention
from pymllm.layers.rotary_embedding import RotaryEmbedding
from pymllm.mem_cache.memory_pool import KVPool, ReqToTokenPool
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams
from pymllm.tests.helpers import record_decode_rope_fusions
from pymllm.testing.tiny_models import tiny_model_dir

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")
BF16 = torch.bfloat16
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kw).with_defaults({})


def _flashinfer_backend_cls():
    pytest.importorskip("flashinfer")
    from pymllm.layers.attention.flashinfer_backend import FlashInferAttnBackend

    return FlashInferAttnBackend


# ---------------- fused ops ----------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 300])
def test_fused_ops_match_reference(dtype, tokens):
    from pymllm.layers.kernels import norm_act_triton, qk_norm_rope_triton

    torch.manual_seed(tokens)
    one_ulp = dict(rtol=ULP[dtype], atol=ULP[dtype])
    for hidden in (1024, 4096, 1000):
        x = torch.randn(tokens, hidden, device=CUDA, dtype=dtype)
        r = torch.randn_like(x)
        w = (1 + 0.1 * torch.randn(hidden, device=CUDA)).to(dtype)
        x0, r0 = x.clone(), r.clone()
        assert fused_ops.rms_norm_supported(x, w, r)
        out = torch.full_like(x, float("nan"))
        res_out = torch.full_like(x, float("nan"))
        normed, summed = norm_act_triton.rms_norm(x, w, 1e-6, residual=r, out=out, residual_out=res_out)
        assert torch.equal(summed, x + r)
        torch.testing.assert_close(normed, rms_norm_reference(x + r, w, 1e-6), **one_ulp)
        torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), **one_ulp)
        assert torch.equal(x, x0) and torch.equal(r, r0)
        gate_up = torch.randn(tokens, 2 * hidden, device=CUDA, dtype=dtype)
        out = torch.full((tokens, hidden), float("nan"), device=CUDA, dtype=dtype)
        got = norm_act_triton.silu_and_mul(gate_up, out=out)
        torch.testing.assert_close(got, fused_ops.silu_and_mul_reference(gate_up), **one_ulp)
    # q/k norm + rope on strided views of a QKV output, Qwen3-8B head layout.
    hq, hk, d = 32, 8, 128
    rope = RotaryEmbedding(d, 4096, types.SimpleNamespace(rope_theta=1e6, rope_scaling=None)).to(CUDA)
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=CUDA, dtype=dtype)
    q = qkv[:, : hq * d].reshape(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].reshape(tokens, hk, d)
    positions = torch.randint(0, 4096, (tokens,), device=CUDA)
    q_norm, k_norm = RMSNorm(d).to(CUDA, dtype), RMSNorm(d).to(CUDA, dtype)
    with torch.no_grad():
        q_norm.weight.normal_(1.0, 0.1)
        k_norm.weight.normal_(1.0, 0.1)
    assert fused_ops.qk_norm_rope_supported(q, k, positions, rope, q_norm, k_norm)
    ref_q, ref_k = rope(positions, rms_norm_reference(q, q_norm.weight, 1e-6), rms_norm_reference(k, k_norm.weight, 1e-6))
    q_out = torch.full((tokens, hq, d), float("nan"), device=CUDA, dtype=dtype)
    k_out = torch.full((tokens, hk, d), float("nan"), device=CUDA, dtype=dtype)
    got_q, got_k = qk_norm_rope_triton.qk_norm_rope(
        q, k, positions, rope.cos_cached, rope.sin_cached, q_norm.weight, k_norm.weight, 1e-6, q_out, k_out
    )
    torch.testing.assert_close(got_q, ref_q, **one_ulp)
    torch.testing.assert_close(got_k, ref_k, **one_ulp)
    got_q, got_k = fused_ops.qk_norm_rope(q, k, positions, rope)
    ref_q, ref_k = rope(positions, q, k)
    torch.testing.assert_close(got_q, ref_q, **one_ulp)
    torch.testing.assert_close(got_k, ref_k, **one_ulp)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)  # fp16/bf16: NaN poison compares bit for bit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 300])
@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 8)], ids=["qwen3-0.6b", "qwen3-8b"])
def test_qk_norm_rope_kv_write_equals_the_separate_store(dtype, tokens, heads, kv_heads):
    from mllm_kernel import store_cache_reference

    from pymllm.layers.fused_ops import KVCacheWrite

    torch.manual_seed(tokens)
    d = 128
    rope = RotaryEmbedding(d, 4096, types.SimpleNamespace(rope_theta=1e6, rope_scaling=None)).to(CUDA)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, device=CUDA, dtype=dtype)
    q = qkv[:, : heads * d].reshape(tokens, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].reshape(tokens, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d :].reshape(tokens, kv_heads, d)
    qkv0 = qkv.clone()
    positions = torch.randint(0, 4096, (tokens,), device=CUDA)
    q_norm, k_norm = RMSNorm(d).to(CUDA, dtype), RMSNorm(d).to(CUDA, dtype)
    with torch.no_grad():
        q_norm.weight.normal_(1.0, 0.1)
        k_norm.weight.normal_(1.0, 0.1)
    pool = KVPool(1024, 1, kv_heads, d, dtype, CUDA)
    k_cache, v_cache = pool.get_kv_buffer(0)
    for norms in ((q_norm, k_norm), (None, None)):
        for loc_dtype in (torch.int32, torch.int64):
            loc = (1 + torch.randperm(1024, device=CUDA)[:tokens]).to(loc_dtype)
            k_cache.fill_(float("nan"))
            v_cache.fill_(float("nan"))
            ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
            kv = KVCacheWrite(v, k_cache, v_cache, loc)
            assert fused_ops.qk_norm_rope_supported(q, k, positions, rope, *norms, kv)
            plain_q, plain_k = fused_ops.qk_norm_rope(q, k, positions, rope, *norms)  # Triton, no write
            got_q, got_k, stored = fused_ops.qk_norm_rope_try_store_kv(q, k, positions, rope, *norms, kv)
            assert stored
            assert torch.equal(_bits(got_q), _bits(plain_q)) and torch.equal(_bits(got_k), _bits(plain_k))
            # What the backend's store would have written from the unfused kernel's k.
            store_cache_reference(plain_k, v, ref_k_cache, ref_v_cache, loc.long())
            assert torch.equal(_bits(k_cache), _bits(ref_k_cache))
            assert torch.equal(_bits(v_cache), _bits(ref_v_cache))
            assert torch.equal(qkv, qkv0)
            ref_k = k if norms[0] is None else rms_norm_reference(k, k_norm.weight, 1e-6)
            _, ref_k = rope(positions, ref_k, ref_k)
            torch.testing.assert_close(k_cache[loc.long()], ref_k, rtol=ULP[dtype], atol=ULP[dtype])


# ---------------- attention, op level ----------------
class _Attn:
    """One attention layer over a small paged pool, run by FlashInfer and torch_native."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int = 128):
        backend_cls = _flashinfer_backend_cls()
        self.layer = RadixAttention(heads, head_dim, head_dim**-0.5, kv_heads, 0)
        self.kv_pool = KVPool(1024, 1, kv_heads, head_dim, BF16, CUDA)
        self.req_pool = ReqToTokenPool(8, 256, CUDA)
        with torch.no_grad():
            for buf in (self.kv_pool.k_buffers[0], self.kv_pool.v_buffers[0]):
                buf.normal_()
        runner = types.SimpleNamespace(
            device=CUDA, dtype=BF16, kv_pool=self.kv_pool, req_to_token_pool=self.req_pool,
            model=torch.nn.ModuleList([self.layer]),
        )
        self.fi = backend_cls(runner)
        self.native = TorchNativeAttnBackend()

    def batch(self, mode: ForwardMode, reqs: List[int], prefix: List[int], new: List[int]) -> ForwardBatch:
        """Request r's token p lives in slot 1 + 256 * r + p (slot 0 stays reserved)."""
        locs = []
        for r, p, n in zip(reqs, prefix, new):
            slots = 1 + 256 * r + torch.arange(p + n, device=CUDA)
            self.req_pool.req_to_token[r, : p + n] = slots.to(torch.int32)
            locs.append(slots[p:])
        seq_lens = [p + n for p, n in zip(prefix, new)]
        fb = ForwardBatch(
            forward_mode=mode, batch_size=len(reqs),
            input_ids=torch.zeros(sum(new), dtype=torch.int64, device=CUDA),
            positions=torch.cat([torch.arange(p, p + n, device=CUDA) for p, n in zip(prefix, new)]),
            req_pool_indices=torch.tensor(reqs, device=CUDA),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=CUDA),
            out_cache_loc=torch.cat(locs), seq_lens_cpu=seq_lens,
            req_to_token_pool=self.req_pool, kv_pool=self.kv_pool,
        )
        if mode.is_extend():
            fb.extend_seq_lens_cpu, fb.extend_prefix_lens_cpu = list(new), list(prefix)
            fb.extend_seq_lens = torch.tensor(new, dtype=torch.int32, device=CUDA)
            fb.extend_prefix_lens = torch.tensor(prefix, dtype=torch.int32, device=CUDA)
        return fb

    def qkv(self, tokens: int):
        q_size = self.layer.num_heads * self.layer.head_dim
        kv_size = self.layer.num_kv_heads * self.layer.head_dim
        return (
            torch.randn(tokens, q_size, device=CUDA, dtype=BF16),
            torch.randn(tokens, kv_size, device=CUDA, dtype=BF16),
            torch.randn(tokens, kv_size, device=CUDA, dtype=BF16),
        )

    def compare(self, fb: ForwardBatch, q, k, v, expected_kind: str) -> None:
        self.fi.init_forward_metadata(fb)
        assert self.fi.forward_metadata.kind == expected_kind
        got = self.fi.forward(q, k, v, self.layer, fb)
        ref = self.native.forward(q, k, v, self.layer, fb)
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 8)], ids=["gqa2-cuda-cores", "gqa4-tensor-cores"])
def test_flashinfer_attention_matches_torch_native(heads, kv_heads):
    torch.manual_seed(heads)
    attn = _Attn(heads, kv_heads)
    assert attn.fi.use_tensor_cores == (heads // kv_heads >= 4)
    new = [37, 5, 120]
    fb = attn.batch(ForwardMode.EXTEND, [0, 1, 2], [0, 0, 0], new)
    attn.compare(fb, *attn.qkv(sum(new)), "ragged")
    new, prefix = [9, 1, 64], [37, 5, 0]
    fb = attn.batch(ForwardMode.EXTEND, [0, 1, 2], prefix, new)
    attn.compare(fb, *attn.qkv(sum(new)), "paged")
    fb = attn.batch(ForwardMode.DECODE, [0, 1, 2], [46, 6, 64], [1, 1, 1])
    attn.compare(fb, *attn.qkv(3), "decode")


@pytest.mark.parametrize("heads,kv_heads", [(16, 8), (32, 8)], ids=["gqa2-cuda-cores", "gqa4-tensor-cores"])
def test_flashinfer_decode_in_a_cuda_graph_with_padding(heads, kv_heads):
    torch.manual_seed(kv_heads + heads)
    attn = _Attn(heads, kv_heads)
    fi, layer, pad_row = attn.fi, attn.layer, attn.req_pool.padding_row
    fi.init_cuda_graph_state(4, 4 * 256)
    # Four padding sequences: the pool's all-zero row, one token, written to the reserved slot 0.
    static = ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=4,
        input_ids=torch.zeros(4, dtype=torch.int64, device=CUDA),
        positions=torch.zeros(4, dtype=torch.int64, device=CUDA),
        req_pool_indices=torch.full((4,), pad_row, dtype=torch.int64, device=CUDA),
        seq_lens=torch.ones(4, dtype=torch.int32, device=CUDA),
        out_cache_loc=torch.zeros(4, dtype=torch.int64, device=CUDA),
        seq_lens_cpu=[1] * 4, req_to_token_pool=attn.req_pool, kv_pool=attn.kv_pool,
    )
    q, k, v = attn.qkv(4)
    fi.init_forward_metadata_capture_cuda_graph(4, static.req_pool_indices, static.seq_lens, [1] * 4)
    fi.forward(q, k, v, layer, static)  # warm-up: JIT modules and lazily built buffers
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fi.forward(q, k, v, layer, static)
    for lens in ([50, 7, 130], [51, 8, 131], [3, 200, 1]):
        real = attn.batch(ForwardMode.DECODE, [0, 1, 2], [n - 1 for n in lens], [1, 1, 1])
        q_new, k_new, v_new = attn.qkv(3)
        for dst, src in ((q, q_new), (k, k_new), (v, v_new)):
            dst[:3].copy_(src)
            dst[3:].normal_()
        static.req_pool_indices[:3].copy_(real.req_pool_indices)
        static.seq_lens[:3].copy_(real.seq_lens)
        static.out_cache_loc[:3].copy_(real.out_cache_loc)
        fi.init_forward_metadata_replay_cuda_graph(4, static.req_pool_indices, static.seq_lens, lens + [1])
        graph.replay()
        ref = attn.native.forward(q_new, k_new, v_new, layer, real)
        torch.testing.assert_close(out[:3], ref, rtol=2e-2, atol=2e-2)


# ---------------- whole models ----------------
def _runner(model_dir, attention_backend: str, **server) -> ModelRunner:
    config = GlobalConfig()
    config.server.model_path = str(model_dir)
    config.server.device = "cuda"
    config.server.dtype = "bfloat16"
    config.server.attention_backend = attention_backend
    config.server.max_total_tokens = 2048
    config.server.max_running_requests = 4
    for key, value in server.items():
        setattr(config.server, key, value)
    config.validate()
    return load_model_runner(config)


def _forward_with(runner, backend, fb):
    fb.attn_backend = backend
    backend.init_forward_metadata(fb)
    with torch.inference_mode():
        return runner.model(fb.input_ids, fb.positions, fb).float()


def _eager_with_graph_kernels(runner, fb, padded_bs):
    """The batch run eagerly with the attention kernel its padded graph uses, so graph replay
    and eager differ only in padding and capture (Triton split-KV decode for small graphs,
    FlashInfer's decode for the others)."""
    from pymllm.layers.attention import flashinfer_backend as fib

    backend = runner.attn_backend
    splits = backend._graph.triton_splits.get(padded_bs)
    if splits is None:
        return _forward_with(runner, backend, fb)
    fb.attn_backend = backend
    backend.forward_metadata = fib._ForwardMetadata("triton_decode", {}, num_splits=splits)
    with torch.inference_mode():
        return runner.model(fb.input_ids, fb.positions, fb).float()


def test_dummy_qwen3_0_6b_shape_logits(tmp_path):
    _flashinfer_backend_cls()
    config = json.loads((REPO / "benchmarks/configs/qwen3-0.6b/config.json").read_text())
    config["num_hidden_layers"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = _runner(tmp_path, "flashinfer", load_format="dummy", disable_cuda_graph=True)
    native = TorchNativeAttnBackend()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151936, (n,), generator=gen).tolist() for n in (200, 17, 64)]
    reqs = []
    for i, ids in enumerate(prompts):
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=greedy(4), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    alloc = runner.token_to_kv_pool_allocator.alloc
    lens = [len(p) for p in prompts]

    def check(batch):
        fb = runner.build_forward_batch(batch)
        got = _forward_with(runner, runner.attn_backend, fb)
        ref = _forward_with(runner, native, fb)
        # Dummy weights make attention nearly uniform, so this is a plumbing check at real
        # shapes; the op-level tests above hold the attention math to bf16 tolerance.
        assert ((got - ref).norm() / ref.norm()).item() < 5e-2
        return ref

    first = [n // 2 for n in lens]
    check(ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * 3, first, alloc(sum(first)), [False] * 3))
    rest = [n - f for n, f in zip(lens, first)]
    ref = check(ScheduledBatch(ForwardMode.EXTEND, reqs, first, rest, alloc(sum(rest)), [True] * 3))
    for step in range(3):
        for req, token in zip(reqs, ref.argmax(-1).tolist()):
            req.output_ids.append(token)
        kv = [len(r.fill_ids) - 1 for r in reqs]
        ref = check(ScheduledBatch(ForwardMode.DECODE, reqs, kv, [1] * 3, alloc(3), [True] * 3))


TINY = dict(head_dim=128, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
PROMPTS = [
    [5, 17, 300, 42, 7, 99, 12, 250, 61, 8, 14, 71, 33],
    [11, 12, 13],
    [400, 2, 90, 91, 92, 93, 94, 95, 96],
    [7],
    [150, 151, 3, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 201, 202, 203, 204],
    [5, 17, 300, 42, 7, 99, 12, 250, 61, 8, 1, 2],  # shares a prefix with the first prompt
]
NEW_TOKENS = [12, 7, 10, 9, 6, 8]


def _run_recorded(attention_backend: str, model=TINY, **overrides):
    """Outputs of the scheduler and the logits of every step."""
    from pymllm.orchestrator.scheduler_process import build_scheduler  # needs pyzmq

    config = GlobalConfig()
    server = config.server
    server.model_path = str(tiny_model_dir("qwen3", **model))
    server.device, server.dtype, server.attention_backend = "cuda", "bfloat16", attention_backend
    server.max_total_tokens, server.max_running_requests, server.max_prefill_tokens = 512, 4, 8
    for key, value in overrides.items():
        setattr(server, key, value)
    config.validate()
    sched = build_scheduler(config)
    runner = sched.runner
    steps: List[torch.Tensor] = []
    forward = runner.forward

    def recording_forward(fb):
        logits = forward(fb)
        steps.append(logits.detach().clone())
        return logits

    runner.forward = recording_forward
    arrivals = [0, 0, 2, 3, 7, 9]
    reqs, step = {}, 0
    while len(reqs) < len(PROMPTS) or sched.has_work():
        for i, at in enumerate(arrivals):
            if at == step:
                msg = TokenizedGenerateReq(str(i), list(PROMPTS[i]), greedy(NEW_TOKENS[i], ignore_eos=True))
                reqs[str(i)] = sched.add_request(msg)
        sched.step()
        step += 1
        assert step < 1000
    return [reqs[str(i)].output_ids for i in range(len(PROMPTS))], steps, runner


def test_greedy_flashinfer_with_graphs_matches_torch_native():
    _flashinfer_backend_cls()
    ref_out, ref_steps, _ = _run_recorded("torch_native")
    fi_out, fi_steps, fi_runner = _run_recorded("flashinfer")
    assert fi_runner.cuda_graph_runner is not None and fi_runner.attn_backend.name == "flashinfer"
    _assert_greedy_runs_agree(ref_out, ref_steps, fi_out, fi_steps)


def _assert_greedy_runs_agree(ref_out, ref_steps, got_out, got_steps) -> None:
    """Two bf16 greedy runs of the same requests: identical tokens mean identical batches, so
    the logits line up step by step until the first differing argmax, where the reference must
    have had a near-tie; before it each step's logits agree by relative norm (the measure that
    fits a whole-model comparison in bf16) within 2 %. Without a parting the tokens are equal."""
    for ref, got in zip(ref_steps, got_steps):
        assert ref.shape == got.shape
        assert ((got - ref).float().norm() / ref.float().norm()).item() < 2e-2
        differ = (ref.argmax(-1) != got.argmax(-1)).nonzero().flatten().tolist()
        if differ:
            top2 = ref[differ].topk(2, dim=-1).values
            assert ((top2[:, 0] - top2[:, 1]) < 0.3).all(), "argmax differs without a near-tie"
            return
    assert got_out == ref_out


def test_fused_kv_write_leaves_the_model_unchanged(monkeypatch):
    """FlashInfer + CUDA graphs with the KV write fused into the norm+rope kernel (default)
    against the backend's separate store: the kernel computes the same k and the store is a
    copy, so the pool and every logit agree bit for bit (all kernels see identical inputs)."""
    _flashinfer_backend_cls()
    from pymllm.layers.attention import flashinfer_backend as fib
    from pymllm.models import llama

    # The q/k-norm-rope kernel with and without its KV write, so the decode attention must not
    # take over both (test_rope_in_decode_attention_leaves_the_model_unchanged covers that).
    monkeypatch.setattr(fib, "DECODE_ROPE_FUSION", False)
    stored = []
    try_store = llama.qk_norm_rope_try_store_kv

    def counting(*args, **kw):
        out = try_store(*args, **kw)
        stored.append(out[2])
        return out

    monkeypatch.setattr(llama, "qk_norm_rope_try_store_kv", counting)
    fused_out, fused_steps, fused_runner = _run_recorded("flashinfer")
    assert fused_runner.cuda_graph_runner is not None and stored and all(stored)
    monkeypatch.setattr(fused_ops, "_kv_write_fast_path_ok", lambda k, kv_write: False)
    stored.clear()
    plain_out, plain_steps, plain_runner = _run_recorded("flashinfer")
    assert stored and not any(stored)
    assert fused_out == plain_out
    for got, ref in zip(fused_steps, plain_steps):
        assert torch.equal(got, ref)
    # Slot 0 is left out: padded graph rows all write there, in no fixed order.
    for got, ref in zip(fused_runner.kv_pool.k_buffers + fused_runner.kv_pool.v_buffers,
                        plain_runner.kv_pool.k_buffers + plain_runner.kv_pool.v_buffers):
        assert torch.equal(_bits(got[1:]), _bits(ref[1:]))


def test_rope_in_decode_attention_leaves_the_model_unchanged(monkeypatch):
    """Graph decode with the q/k norms, rope and KV store inside the Triton attention kernel
    (default, one-row graphs) against the q/k-norm-rope kernel before it: the same rounding
    except the norm's sum order, whose last-bit differences the random tiny model carries through
    its bf16 layers like any other rounding; so the bound of the torch_native comparison above,
    and matching tokens (or a parting at a near-tie)."""
    _flashinfer_backend_cls()
    from pymllm.layers.attention import flashinfer_backend as fib

    calls = record_decode_rope_fusions(monkeypatch)
    on_out, on_steps, _ = _run_recorded("flashinfer")
    assert any(calls)  # graph decode fuses; eager decode (the warm-up's, FlashInfer's kernel) cannot
    monkeypatch.setattr(fib, "DECODE_ROPE_FUSION", False)
    calls.clear()
    off_out, off_steps, _ = _run_recorded("flashinfer")
    assert calls and not any(calls)
    _assert_greedy_runs_agree(off_out, off_steps, on_out, on_steps)


def test_programmatic_dependent_launch_leaves_the_model_unchanged():
    """Decode graphs whose kernels launch as programmatic dependents (SM90+) against plain
    launches: the same kernels run on the same inputs, so tokens and every logit agree bit for
    bit. A kernel that read an activation before the kernel writing it had finished would not.
    The model is wide enough (hidden 1024) for the decode GEMVs to be chosen where they win."""
    from mllm_kernel import pdl

    _flashinfer_backend_cls()
    if not pdl.capability_supports_pdl(torch.cuda.get_device_capability()):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    wide = dict(TINY, hidden_size=1024, intermediate_size=3072, num_attention_heads=8, num_key_value_heads=4)
    try:
        on_out, on_steps, on_runner = _run_recorded("flashinfer", model=wide)
        assert on_runner.cuda_graph_runner is not None and pdl.is_enabled()
        off_out, off_steps, _ = _run_recorded("flashinfer", model=wide, disable_pdl=True)
        assert not pdl.is_enabled()
    finally:
        pdl.set_enabled(True)
    assert on_out == off_out
    assert len(on_steps) == len(off_steps)
    for got, ref in zip(on_steps, off_steps):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("num_reqs, padded_bs", [(3, 4), (130, 136)])
def test_graph_replay_with_padding_equals_eager(num_reqs, padded_bs):
    """3 requests replay the bs-4 graph (Triton decode), 130 the bs-136 graph (FlashInfer decode,
    whose kv_indices the graph gathers itself after recording the step's slots in req_to_token).
    Greedy sampling reads the argmax the graph took."""
    from pymllm.layers.attention import flashinfer_backend as fib

    _flashinfer_backend_cls()
    runner = _runner(tiny_model_dir("qwen3", **TINY), "flashinfer", max_running_requests=136,
                     max_total_tokens=4096)
    graphs = runner.cuda_graph_runner
    assert graphs is not None and graphs.batch_sizes[:3] == [1, 2, 4]
    flashinfer_graph = padded_bs > fib.TRITON_GRAPH_DECODE_MAX_BS
    assert (padded_bs in runner.attn_backend._graph.kv_indices_in_graph) == flashinfer_graph
    gen = torch.Generator().manual_seed(num_reqs)
    prompts = [torch.randint(1, 400, (int(n),), generator=gen).tolist()
               for n in torch.randint(3, 14, (num_reqs,), generator=gen)]
    reqs = []
    for i, ids in enumerate(prompts):
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=greedy(4), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    lens = [len(r.origin_input_ids) for r in reqs]
    alloc = runner.token_to_kv_pool_allocator.alloc
    logits = runner.forward(runner.build_forward_batch(
        ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * num_reqs, lens, alloc(sum(lens)), [True] * num_reqs)
    ))
    next_ids = logits.argmax(-1).tolist()
    for _ in range(3):
        for req, token in zip(reqs, next_ids):
            req.output_ids.append(token)
        kv = [len(r.fill_ids) - 1 for r in reqs]
        batch = ScheduledBatch(ForwardMode.DECODE, reqs, kv, [1] * num_reqs, alloc(num_reqs), [True] * num_reqs)
        fb = runner.build_forward_batch(batch)
        assert graphs.can_run(fb)
        logits = runner.forward(fb)  # replays the padded graph (a predicted step: launched when staged)
        next_ids = runner.sample(logits, batch).next_token_ids
        assert next_ids == logits.argmax(-1).tolist()
        # The graph's argmax fed its ids into the static input tokens (the next step's input), so
        # the eager reference gets the step's own tokens back.
        assert fb.input_ids.tolist() == next_ids
        fb.input_ids.copy_(torch.tensor([r.output_ids[-1] for r in reqs], device=fb.input_ids.device))
        logits = logits.clone()
        eager = _eager_with_graph_kernels(runner, fb, padded_bs=padded_bs)
        # The eager run multiplies num_reqs rows, the graph padded_bs rows: the decode matmuls
        # may take different measured kernels or GEMV tilings for the two row counts (a
        # different float32 summation order, then bf16 rounding through every layer), which
        # moved ~1 % of the logits by up to 3 bf16 ulps in one suite run. So the whole-model
        # measure used elsewhere (relative norm), plus a bound no misplaced row could meet.
        assert torch.isfinite(logits).all()
        assert ((logits - eager).norm() / eager.norm()).item() < 1e-2
        assert (logits - eager).abs().max().item() < 0.5
        padding = runner.req_to_token_pool.req_to_token[runner.req_to_token_pool.padding_row]
        assert padding.eq(0).all(), "padding rows leave their row all-zero"

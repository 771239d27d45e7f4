"""FlashInfer backend on CPU: index math, dispatch rules, and the whole backend against
torch_native with a PyTorch stand-in for the flashinfer package.

The stand-in's wrappers have FlashInfer 0.6.7's constructor / plan() / run() parameter
names and order (calls are bound to those signatures, so a misnamed or misplaced argument
fails), keep plan()'s buffer semantics (graph mode copies into the buffers given at
construction and run() reads them there, as a captured kernel would), and compute attention
from exactly the index arrays they were planned with. ``run(..., return_lse=True)`` also
returns the log-sum-exp of the scaled scores in base 2 ([tokens, heads] float32), as FlashInfer's
kernels write it (``log2(d) + m`` with the scores pre-scaled by ``sm_scale * log2(e)``, FA2 and
FA3 alike), and ``merge_state_in_place`` merges two such states with base-2 weights, skipping
rows whose mask is False. Kernel numerics are the GPU tests' job.
"""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types

import pytest
import torch

from pymllm.configs import GlobalConfig
from pymllm.configs.errors import ConfigError
from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor.cuda_graph_runner import CudaGraphRunner
from pymllm.executor.model_runner import ModelRunner, load_model_runner
from pymllm.layers.attention import flashinfer_backend as fib
from pymllm.layers.attention import flashinfer_extend as fx
from pymllm.layers.kernels.kv_cache_ops import KVCacheOps, gather_kv_indices, indptr_from_lens
from pymllm.layers.radix_attention import RadixAttention
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy


# ---------------- pure index math ----------------
def test_indptr_is_exclusive_prefix_sum_on_host():
    out = indptr_from_lens([3, 0, 5])
    assert out.dtype == torch.int32 and out.device.type == "cpu"
    assert out.tolist() == [0, 3, 3, 8]
    assert indptr_from_lens([]).tolist() == [0]


def _table():
    req_to_token = torch.zeros(5, 12, dtype=torch.int32)
    req_to_token[1, :4] = torch.tensor([7, 8, 9, 10])
    req_to_token[3, :6] = torch.tensor([20, 21, 22, 23, 24, 25])
    req_to_token[0, :2] = torch.tensor([30, 31])
    return req_to_token


def test_gather_kv_indices_follows_req_to_token():
    req_to_token = _table()
    lens = [4, 2, 6]
    req_idx = torch.tensor([1, 0, 3])
    indptr = indptr_from_lens(lens)
    got = gather_kv_indices(req_to_token, req_idx, torch.tensor(lens, dtype=torch.int32), indptr, sum(lens))
    assert got.dtype == torch.int32
    assert got.tolist() == [7, 8, 9, 10, 30, 31, 20, 21, 22, 23, 24, 25]
    out = torch.full((20,), -1, dtype=torch.int32)
    view = gather_kv_indices(req_to_token, req_idx, torch.tensor(lens, dtype=torch.int32), indptr, 12, out)
    assert view.data_ptr() == out.data_ptr() and out[:12].tolist() == got.tolist()
    assert (out[12:] == -1).all(), "nothing past the total is written"


def test_gather_matches_mllm_kernel_reference():
    ref = pytest.importorskip("mllm_kernel.cuda.jit").create_kv_indices_reference
    req_to_token = _table()
    lens = torch.tensor([4, 6], dtype=torch.int32)
    req_idx = torch.tensor([1, 3])
    indptr = indptr_from_lens(lens.tolist())
    expected = ref(req_to_token, req_idx, lens, indptr)
    assert gather_kv_indices(req_to_token, req_idx, lens, indptr, 10).tolist() == expected.tolist()


def test_kv_cache_ops_on_cpu_use_pytorch():
    ops = KVCacheOps(torch.device("cpu"), torch.float32)
    assert not ops.uses_mllm_kernel
    k = torch.randn(2, 1, 4)
    assert not ops.try_store(k, k, torch.zeros(4, 1, 4), torch.zeros(4, 1, 4), torch.tensor([1, 2]))
    lens = torch.tensor([4], dtype=torch.int32)
    got = ops.kv_indices(_table(), torch.tensor([1]), lens, indptr_from_lens([4]), 4)
    assert got.tolist() == [7, 8, 9, 10]


# ---------------- dispatch rules ----------------
@pytest.mark.parametrize(
    "heads,kv_heads,dtype,expected",
    [
        (16, 8, torch.bfloat16, False),  # Qwen3-0.6B: group 2
        (8, 8, torch.float16, False),  # MHA
        (24, 8, torch.bfloat16, False),  # group 3
        (32, 8, torch.bfloat16, True),  # Qwen3-8B: group 4
        (64, 8, torch.float16, True),  # group 8
        (28, 4, torch.bfloat16, True),  # group 7: no CUDA-core kernel
        (16, 8, torch.float8_e4m3fn, True),  # fp8 KV
    ],
)
def test_decode_tensor_core_rule(heads, kv_heads, dtype, expected):
    assert fib.decode_use_tensor_cores(heads, kv_heads, dtype) is expected


def test_window_left_and_ragged_choice():
    assert fib.window_left_for(None) == -1
    assert fib.window_left_for(4096) == 4095
    assert fib.extend_uses_ragged([0, 0])
    assert not fib.extend_uses_ragged([0, 3])


def test_geometry_groups_windows_and_rejects_mixed_shapes():
    layers = [RadixAttention(4, 16, 0.25, 2, 0), RadixAttention(4, 16, 0.25, 2, 1, sliding_window=8)]
    geo = fib.AttentionGeometry.from_layers(layers)
    assert (geo.num_qo_heads, geo.num_kv_heads, geo.head_dim, geo.sm_scale) == (4, 2, 16, 0.25)
    assert geo.window_lefts == (-1, 7)
    with pytest.raises(ConfigError, match="attention_backend"):
        fib.AttentionGeometry.from_layers(layers + [RadixAttention(8, 16, 0.25, 2, 2)])


def test_backend_refuses_cpu_and_float32():
    with pytest.raises(ConfigError, match="CUDA"):
        fib.check_supported(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="float32"):
        fib.check_supported(torch.device("cuda"), torch.float32)
    fib.check_supported(torch.device("cuda"), torch.bfloat16)


# ---------------- a PyTorch stand-in for flashinfer ----------------
def _attend(q, k, v, q_pos, k_pos, causal, window_left, sm_scale):
    """q: [Lq, Hq, D], k/v: [Lk, Hkv, D] float; FlashInfer's mask: key j visible to query at
    position p iff (not causal or j <= p) and (window_left < 0 or j >= p - window_left).
    Returns the output and the base-2 log-sum-exp of the scaled scores, [Lq, Hq] float32."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * sm_scale
    mask = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    if causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if window_left >= 0:
        mask &= k_pos[None, :] >= q_pos[:, None] - window_left
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(q.dtype).contiguous()
    return out, (torch.logsumexp(scores, dim=-1) / math.log(2)).T.contiguous()


def _maybe_lse(out, lse, return_lse):
    return (out, lse) if return_lse else out


PREFILL_BACKENDS = ("auto", "fa2", "fa3")


def fake_merge_state_in_place(v, s, v_other, s_other, mask=None):
    """FlashInfer's merge_state_in_place: v/s become the state of both KV segments (base 2)."""
    assert v.shape == v_other.shape and v.dim() == 3 and v.is_contiguous() and v_other.is_contiguous()
    assert s.shape == s_other.shape == v.shape[:2] and s.dtype == s_other.dtype == torch.float32
    rows = torch.ones(len(v), dtype=torch.bool)
    if mask is not None:
        assert mask.dim() == 1 and len(mask) == len(v) and mask.dtype == torch.bool
        rows = mask.cpu()
    s_max = torch.maximum(s, s_other)
    w, w_other = torch.exp2(s - s_max), torch.exp2(s_other - s_max)
    merged = (w[..., None] * v.float() + w_other[..., None] * v_other.float()) / (w + w_other)[..., None]
    v[rows] = merged[rows].to(v.dtype)
    s[rows] = (torch.log2(w + w_other) + s_max)[rows]


class _Wrapper:
    def _keep(self, window_left, sm_scale, q_data_type, kv_data_type, causal=False):
        self.window_left, self.causal = window_left, causal
        self.sm_scale = sm_scale
        self.dtypes = (q_data_type, kv_data_type)
        self.planned = True

    def _paged(self, q, paged_kv_cache, qo_indptr, kv_indptr, kv_indices, last_page_len):
        assert self.planned and q.dtype == self.dtypes[0]
        k_cache, v_cache = paged_kv_cache
        assert k_cache.dim() == 3 and k_cache.dtype == self.dtypes[1]
        assert (last_page_len == 1).all()
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32)
        for i in range(len(kv_indptr) - 1):
            slots = kv_indices[kv_indptr[i] : kv_indptr[i + 1]].long()
            rows = slice(int(qo_indptr[i]), int(qo_indptr[i + 1]))
            kv_len, q_len = len(slots), rows.stop - rows.start
            q_pos = torch.arange(kv_len - q_len, kv_len)
            out[rows], lse[rows] = _attend(q[rows], k_cache[slots], v_cache[slots], q_pos, torch.arange(kv_len),
                                           self.causal, self.window_left, self.sm_scale)
        return out, lse


class FakeDecodeWrapper(_Wrapper):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None,
                 paged_kv_last_page_len_buffer=None, backend="auto", jit_args=None):
        assert kv_layout == "NHD" and float_workspace_buffer.dtype == torch.uint8
        self.use_cuda_graph, self.use_tensor_cores = use_cuda_graph, use_tensor_cores
        if use_cuda_graph:
            assert len(paged_kv_indptr_buffer) == len(paged_kv_last_page_len_buffer) + 1
        self.indptr, self.indices, self.last = paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer
        self.planned = False

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size,
             pos_encoding_mode="NONE", window_left=-1, logits_soft_cap=None, q_data_type="float16",
             kv_data_type=None, o_data_type=None, data_type=None, sm_scale=None, rope_scale=None,
             rope_theta=None, non_blocking=True, block_tables=None, seq_lens=None, fixed_split_size=None,
             disable_split_kv=False):
        assert page_size == 1 and indptr.device.type == "cpu" and last_page_len.device.type == "cpu"
        assert indptr.dtype == torch.int32 and len(indices) >= int(indptr[-1])
        if self.use_cuda_graph:
            assert len(last_page_len) == len(self.last), "graph wrappers have a fixed batch size"
            self.indptr.copy_(indptr)
            self.last.copy_(last_page_len)
            self.indices[: len(indices)].copy_(indices)
        else:
            self.indptr, self.indices, self.last = indptr.clone(), indices, last_page_len.clone()
        self._keep(window_left, sm_scale, q_data_type, kv_data_type)

    def run(self, q, paged_kv_cache, *args, **kwargs):
        assert q.shape[0] == len(self.last)
        qo_indptr = torch.arange(q.shape[0] + 1)
        return self._paged(q, paged_kv_cache, qo_indptr, self.indptr, self.indices, self.last)[0]


class FakePagedPrefillWrapper(_Wrapper):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None,
                 paged_kv_indptr_buf=None, paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None,
                 custom_mask_buf=None, mask_indptr_buf=None, backend="auto", jit_args=None, jit_kwargs=None):
        assert kv_layout == "NHD" and not use_cuda_graph and backend in PREFILL_BACKENDS
        self.backend = backend
        self.planned = False

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim_qk, page_size, head_dim_vo=None, custom_mask=None, packed_custom_mask=None,
             causal=False, pos_encoding_mode="NONE", use_fp16_qk_reduction=False, sm_scale=None, window_left=-1,
             logits_soft_cap=None, rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None,
             o_data_type=None, non_blocking=True, **rest):
        assert page_size == 1 and qo_indptr.device.type == "cpu" and paged_kv_indptr.device.type == "cpu"
        assert len(paged_kv_indices) == int(paged_kv_indptr[-1])
        # The backend never hands FlashInfer an empty KV range (its result there is not relied on).
        assert (paged_kv_indptr[1:] > paged_kv_indptr[:-1]).all(), "empty KV range"
        self.args = (qo_indptr.clone(), paged_kv_indptr.clone(), paged_kv_indices, paged_kv_last_page_len.clone())
        self._keep(window_left, sm_scale, q_data_type, kv_data_type, causal)

    def run(self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None, lse=None,
            return_lse=False, enable_pdl=None, window_left=None, **kwargs):
        return _maybe_lse(*self._paged(q, paged_kv_cache, *self.args), return_lse)


class FakeRaggedPrefillWrapper(_Wrapper):
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, qo_indptr_buf=None,
                 kv_indptr_buf=None, custom_mask_buf=None, mask_indptr_buf=None, backend="auto",
                 jit_args=None, jit_kwargs=None):
        assert kv_layout == "NHD" and not use_cuda_graph and backend in PREFILL_BACKENDS
        self.backend = backend
        self.planned = False

    def plan(self, qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim_qk, head_dim_vo=None,
             custom_mask=None, packed_custom_mask=None, causal=False, pos_encoding_mode="NONE",
             use_fp16_qk_reduction=False, window_left=-1, logits_soft_cap=None, sm_scale=None, rope_scale=None,
             rope_theta=None, q_data_type="float16", kv_data_type=None, **rest):
        assert qo_indptr.device.type == "cpu"
        self.qo_indptr, self.kv_indptr = qo_indptr.clone(), kv_indptr.clone()
        self._keep(window_left, sm_scale, q_data_type, kv_data_type, causal)

    def run(self, q, k, v, *args, q_scale=None, k_scale=None, v_scale=None, o_scale=None, out=None, lse=None,
            return_lse=False, enable_pdl=None, **kwargs):
        assert self.planned and k.shape[0] == int(self.kv_indptr[-1])
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32)
        for i in range(len(self.qo_indptr) - 1):
            rows = slice(int(self.qo_indptr[i]), int(self.qo_indptr[i + 1]))
            keys = slice(int(self.kv_indptr[i]), int(self.kv_indptr[i + 1]))
            kv_len, q_len = keys.stop - keys.start, rows.stop - rows.start
            q_pos = torch.arange(kv_len - q_len, kv_len)  # queries are the last q_len positions
            out[rows], lse[rows] = _attend(q[rows], k[keys], v[keys], q_pos, torch.arange(kv_len), self.causal,
                                           self.window_left, self.sm_scale)
        return _maybe_lse(out, lse, return_lse)


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module = types.ModuleType("flashinfer")
    module.__spec__ = importlib.machinery.ModuleSpec("flashinfer", None)
    module.BatchDecodeWithPagedKVCacheWrapper = FakeDecodeWrapper
    module.BatchPrefillWithPagedKVCacheWrapper = FakePagedPrefillWrapper
    module.BatchPrefillWithRaggedKVCacheWrapper = FakeRaggedPrefillWrapper
    module.merge_state_in_place = fake_merge_state_in_place
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    monkeypatch.setattr(fib, "check_supported", lambda device, dtype: None)
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 1024)
    return module


# ---------------- the backend against torch_native ----------------
def _runner(model_dir, **server) -> ModelRunner:
    config = GlobalConfig()
    config.server.model_path = str(model_dir)
    config.server.device = "cpu"
    config.server.dtype = "float32"
    config.server.max_total_tokens = 256
    config.server.max_running_requests = 4
    for key, value in server.items():
        setattr(config.server, key, value)
    return load_model_runner(config)


def _forward_with(runner, backend, fb):
    fb.attn_backend = backend
    backend.init_forward_metadata(fb)
    with torch.inference_mode():
        return runner.model(fb.input_ids, fb.positions, fb).float()


def _both(runner, native, fi_backend, batch: ScheduledBatch):
    """Logits of one batch with torch_native and with the FlashInfer backend (same KV writes)."""
    fb = runner.build_forward_batch(batch)
    ref = _forward_with(runner, native, fb)
    got = _forward_with(runner, fi_backend, fb)
    return ref, got, fi_backend.forward_metadata.kind


PROMPTS = [[5, 17, 300, 42, 7, 99, 12, 250, 61], [11, 12, 13, 14, 15], [400, 2, 90]]


@pytest.mark.parametrize("arch,window", [("qwen3", None), ("qwen2", 4)])
def test_backend_matches_torch_native(fake_flashinfer, arch, window):
    extra = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1) if window else {}
    runner = _runner(tiny_model_dir(arch, **extra))
    native = runner.attn_backend
    backend = fib.FlashInferAttnBackend(runner)
    assert len(backend.geometry.window_lefts) == (2 if window else 1)
    reqs = []
    for i, ids in enumerate(PROMPTS):
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=greedy(8), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    alloc = runner.token_to_kv_pool_allocator.alloc

    # Chunk 1 of every prompt: no cached prefix -> ragged.
    first = [3, 2, 3]
    batch = ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * 3, first, alloc(sum(first)), [False, False, True])
    ref, got, kind = _both(runner, native, backend, batch)
    assert kind == "ragged"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # The rest on top of the cached chunk -> the default extend strategy's kind (the third
    # prompt is already complete).
    rest = [len(p) - n for p, n in zip(PROMPTS[:2], first)]
    batch = ScheduledBatch(ForwardMode.EXTEND, reqs[:2], first[:2], rest, alloc(sum(rest)), [True, True])
    ref, got, kind = _both(runner, native, backend, batch)
    assert kind == fx.extend_kind(fx.DEFAULT_EXTEND_STRATEGY, first[:2], backend.geometry.window_lefts) != "ragged"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    for req in reqs:
        req.output_ids.append(req.origin_input_ids[-1])

    # Decode: one eager step, then steps through the CUDA-graph path, padded from 3 to 4: a
    # batch built without the graph runner (copied into the static buffers at replay), then
    # batches that build_forward_batch stages straight into them.
    runner.attn_backend = backend
    graphs = CudaGraphRunner(runner)
    assert graphs.batch_sizes[:3] == [1, 2, 4]
    for bs in reversed(graphs.batch_sizes):
        graphs.prepare_capture(bs)
    k_buf = runner.kv_pool.k_buffers[0]
    for step in range(4):
        lens = [len(r.fill_ids) - 1 for r in reqs]
        slots = alloc(3)
        runner.cuda_graph_runner = graphs if step >= 2 else None
        fb = runner.build_forward_batch(ScheduledBatch(ForwardMode.DECODE, reqs, lens, [1] * 3, slots, [True] * 3))
        runner.cuda_graph_runner = None
        if step >= 2:
            assert fb.input_ids.data_ptr() == graphs.inputs.input_ids.data_ptr(), "staged in place"
        if step == 0:
            got = _forward_with(runner, backend, fb)
        else:
            before = k_buf.clone()
            assert graphs.prepare_replay(fb) == 4
            tokens = fb.input_ids.clone()
            with torch.inference_mode():
                got, ids = graphs.run_static(4)
            got = got[:3]
            assert torch.equal(ids[:3], got.argmax(-1))
            # The graph's argmax feeds its ids into the static input tokens (the next step's).
            assert torch.equal(graphs.inputs.input_ids[:3], ids[:3])
            fb.input_ids.copy_(tokens)
            changed = (k_buf != before).flatten(1).any(1).nonzero().flatten().tolist()
            assert set(changed) <= {0, *slots.tolist()}, "padding wrote outside the reserved slot 0"
        ref = _forward_with(runner, native, fb)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        for req, token in zip(reqs, ref.argmax(-1).tolist()):
            req.output_ids.append(token)


class _CapturableKVOps:
    """The PyTorch KV ops posing as mllm_kernel's graph-safe gather (which sizes itself from
    kv_indptr on the device; here the total is read back, fine on the CPU)."""

    kv_indices_capturable = True

    def __init__(self, inner):
        self.inner, self.gathers = inner, 0

    def kv_indices(self, req_to_token, req_pool_indices, seq_lens, kv_indptr, total, out=None):
        self.gathers += 1
        return self.inner.kv_indices(req_to_token, req_pool_indices, seq_lens, kv_indptr, int(kv_indptr[-1]), out)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("capturable", [False, True])
def test_graphs_record_their_slots_and_gather_kv_indices_themselves(fake_flashinfer, capturable):  # noqa: F811
    """A FlashInfer-decoded graph with a graph-safe kv_indices gather writes the batch's slots
    into req_to_token and gathers kv_indices inside the graph (after plan() copied kv_indptr), so
    neither happens before replay; without one, staging writes the slots and the replay's
    metadata step gathers, as before. Either way the graph's logits are torch_native's."""
    runner = _runner(tiny_model_dir("qwen3"))
    native = runner.attn_backend
    backend = fib.FlashInferAttnBackend(runner)
    if capturable:
        backend.kv_ops = _CapturableKVOps(backend.kv_ops)
    reqs = []
    for i, ids in enumerate(PROMPTS[:3]):
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=greedy(4), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    alloc = runner.token_to_kv_pool_allocator.alloc
    lens = [len(p) for p in PROMPTS[:3]]
    result = runner.run_batch(ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * 3, lens, alloc(sum(lens)), [True] * 3))
    for req, token in zip(reqs, result.next_token_ids):
        req.output_ids.append(token)
    runner.attn_backend = backend
    graphs = CudaGraphRunner(runner)
    for bs in reversed(graphs.batch_sizes):
        graphs.prepare_capture(bs)
    st = backend._graph
    assert (4 in st.kv_indices_in_graph) == capturable
    assert (graphs._prologues[(4, False)] is not None) == capturable
    table = runner.req_to_token_pool.req_to_token
    for _ in range(2):
        slots = alloc(3)
        runner.cuda_graph_runner = graphs
        fb = runner.build_forward_batch(ScheduledBatch(ForwardMode.DECODE, reqs, lens, [1] * 3, slots, [True] * 3))
        runner.cuda_graph_runner = None
        written = [int(table[r.req_pool_idx, n]) for r, n in zip(reqs, lens)]
        assert written == ([0, 0, 0] if capturable else slots.tolist())
        gathers = backend.kv_ops.gathers if capturable else None
        assert graphs.prepare_replay(fb) == 4
        if capturable:
            assert backend.kv_ops.gathers == gathers, "the graph gathers kv_indices, not the replay step"
        tokens = graphs.inputs.input_ids.clone()
        with torch.inference_mode():
            got, ids = graphs.run_static(4)
        graphs.inputs.input_ids.copy_(tokens)  # the argmax fed its ids there; the reference reads the step's
        assert [int(table[r.req_pool_idx, n]) for r, n in zip(reqs, lens)] == slots.tolist()
        assert table[runner.req_to_token_pool.padding_row].eq(0).all(), "the padding row stays all-zero"
        ref = _forward_with(runner, native, fb)
        torch.testing.assert_close(got[:3], ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(ids, got.argmax(-1))
        for req, token in zip(reqs, ids[:3].tolist()):
            req.output_ids.append(token)
        lens = [n + 1 for n in lens]


# ---------------- extend on a cached prefix: the strategies ----------------
def test_extend_strategy_rules():
    assert fx.DEFAULT_EXTEND_STRATEGY in fx.EXTEND_STRATEGIES
    assert fx.check_extend_strategy(None) == fx.DEFAULT_EXTEND_STRATEGY
    with pytest.raises(ConfigError, match="extend strategy"):
        fx.check_extend_strategy("fa4")
    assert [fx.prefix_prefill_backend(s) for s in fx.EXTEND_STRATEGIES] == ["auto", "fa2", "auto", "fa2"]
    for strategy in fx.EXTEND_STRATEGIES:
        assert fx.extend_kind(strategy, [0, 0], (-1,)) == "ragged"
        assert fx.extend_kind(strategy, [0, 5], (-1, 7)) == "paged", "windows: no cascade"
        expected = "cascade" if strategy.startswith("cascade") else "paged"
        assert fx.extend_kind(strategy, [0, 5], (-1,)) == expected
    assert fx.cascade_prefix_lens([0, 5, 1]) == [1, 5, 1]


def test_fake_merge_is_attention_over_both_segments():
    """The stand-in's LSE (base 2) and merge compose like attention over the joined keys."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, n, 8, generator=gen) for n in (4, 2, 2))
    pos = torch.arange(5)
    full, full_lse = _attend(q, k, v, pos, pos, False, -1, 0.3)
    a, a_lse = _attend(q, k[:2], v[:2], pos, torch.arange(2), False, -1, 0.3)
    b, b_lse = _attend(q, k[2:], v[2:], pos, torch.arange(3), False, -1, 0.3)
    mask = torch.tensor([True, True, False, True, True])
    kept = a[2].clone()
    fake_merge_state_in_place(a, a_lse, b, b_lse, mask=mask)
    torch.testing.assert_close(a[mask], full[mask])
    torch.testing.assert_close(a_lse[mask], full_lse[mask])
    assert torch.equal(a[2], kept), "masked rows are left alone"


def _new_req(runner, rid: str, ids):
    req = Req(rid=rid, origin_input_ids=list(ids), sampling_params=greedy(4), seed=0)
    req.req_pool_idx = runner.req_to_token_pool.alloc()
    return req


@pytest.mark.parametrize("strategy", fx.EXTEND_STRATEGIES)
@pytest.mark.parametrize(
    "arch,window,heads",
    [("qwen3", None, {}), ("qwen3", None, dict(num_attention_heads=8, num_key_value_heads=2)), ("qwen2", 4, {})],
    ids=["gqa2", "gqa4", "window"],
)
def test_extend_strategies_match_torch_native(fake_flashinfer, strategy, arch, window, heads):
    extra = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1) if window else {}
    runner = _runner(tiny_model_dir(arch, **extra, **heads))
    native = runner.attn_backend
    backend = fib.FlashInferAttnBackend(runner, extend_strategy=strategy)
    assert all(w.backend == fx.prefix_prefill_backend(strategy) for w in backend._prefill_paged.values())
    assert all(w.backend == "auto" for w in backend._prefill_ragged.values())
    with_prefix = "cascade" if strategy.startswith("cascade") and not window else "paged"
    alloc = runner.token_to_kv_pool_allocator.alloc
    a = _new_req(runner, "a", PROMPTS[0])  # 9 tokens
    b = _new_req(runner, "b", PROMPTS[1])
    first = alloc(8)
    ref, got, kind = _both(runner, native, backend,
                           ScheduledBatch(ForwardMode.EXTEND, [a, b], [0, 0], [3, 5], first, [False, True]))
    assert kind == "ragged"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # A mixed batch: a's second chunk, c hitting the prefix cache on a's first 3 tokens (its
    # row gets a's slots, as the scheduler arranges it) and d with nothing cached.
    c = _new_req(runner, "c", PROMPTS[0][:3] + [77, 78, 79, 80])
    c.kv_slots, c.cache_owned_len = first[:3], 3
    d = _new_req(runner, "d", PROMPTS[2] + [5, 6, 7])
    batch = ScheduledBatch(ForwardMode.EXTEND, [a, c, d], [3, 3, 0], [6, 4, 4], alloc(14), [True, True, False])
    ref, got, kind = _both(runner, native, backend, batch)
    assert kind == with_prefix
    if kind == "cascade":
        assert backend.forward_metadata.merge_mask.tolist() == [True] * 10 + [False] * 4
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # Every sequence with a prefix (no merge mask); a one-token extend among them.
    batch = ScheduledBatch(ForwardMode.EXTEND, [d, b], [4, 4], [2, 1], alloc(3), [True, True])
    ref, got, kind = _both(runner, native, backend, batch)
    assert kind == with_prefix
    if kind == "cascade":
        assert backend.forward_metadata.merge_mask is None
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)

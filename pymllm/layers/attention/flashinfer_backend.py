"""FlashInfer attention over the paged KV pool (page size 1), with a CUDA-graph decode path.

The KV pool keeps per-layer K and V buffers of shape [num_slots + 1, H_kv, D]; FlashInfer
reads them as ``(k_buf, v_buf)`` in layout "NHD" with page size 1 (it adds the page axis
itself for 3-D caches), so one KV slot is one page and ``kv_last_page_len`` is all ones.

Kernels per forward mode:
- decode: ``BatchDecodeWithPagedKVCacheWrapper``. ``use_tensor_cores`` follows
  ``decode_use_tensor_cores``: the tensor-core path runs FlashInfer's prefill kernel with one
  query row per request; its MMA tiles amortise each K/V load over the GQA group, which pays
  from a group size of 4 on, and it is the only path for fp8 KV caches and for group sizes
  the CUDA-core decode kernel was not instantiated for (it has 1, 2, 3, 4 and 8).
- extend without a cached prefix (plain prefill): ``BatchPrefillWithRaggedKVCacheWrapper`` on
  the new k/v tensors as they come out of the projection. They are still written to the pool
  for later steps, but attention reads them contiguously instead of gathering them slot by
  slot through kv_indices, and no kv_indices need to be built.
- extend on top of a cached prefix (chunked prefill, prefix-cache hits, mixed batches): one
  of the strategies of ``flashinfer_extend`` (``extend_strategy``): a causal
  ``BatchPrefillWithPagedKVCacheWrapper`` over prefix + new tokens through kv_indices (the new
  tokens' K/V are written to the pool first), with backend "auto" or "fa2"; or a cascade of a
  ragged causal pass over the new tokens and a paged pass over the prefix, merged by LSE.

``plan()`` runs once per forward in ``init_forward_metadata`` and every layer reuses it.
Layers with a sliding window get their own wrapper planned with ``window_left``; all wrappers
share one float workspace buffer (they run one after another on one stream). Index arrays
that plan() reads on the host (indptr, last_page_len) are passed as host tensors built from
the batch's host-side lengths, so planning never waits for the GPU.

CUDA graphs: small batches (``graph_decode_kernel``) decode with the Triton split-KV kernel of
``triton_decode``, which reads the static seq_lens and ``req_to_token`` itself, so their replay
needs no host-side attention work. For larger batches, decode wrappers created with
``use_cuda_graph=True`` keep reading the static
kv_indptr / kv_indices / last_page_len buffers that were given at capture time. FlashInfer's
plan in graph mode fixes the launch grid and the workspace layout by batch size alone (split-kv
is always on), so re-planning before each replay with the new lengths refreshes the schedule
in the workspace without changing what the captured kernels read. Graphs captured for a short
extend of one request (one row per new token, ``shared_prefix``) use
``triton_shared_prefix.shared_prefix_attention``, which reads the request's KV once for all rows.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from pymllm.configs.errors import ConfigError
from pymllm.engine.forward_batch import ForwardBatch
from pymllm.layers.attention.base_backend import AttentionBackend
from pymllm.layers.attention import flashinfer_extend as fx
from pymllm.layers.kernels.kv_cache_ops import KVCacheOps, indptr_from_lens
from pymllm.layers.radix_attention import RadixAttention

if TYPE_CHECKING:
    from torch import nn

# Graph batches up to this size decode with the Triton split-KV kernel, which reads lengths and
# the page table on the device; larger ones use FlashInfer (see graph_decode_kernel). 128 is the
# largest batch measured (scripts/tune_triton_decode.py): there, as at every size from 16 on, the
# Triton kernel was faster than FlashInfer's decode (bs 64, 1k tokens, Qwen3-8B heads: 66.6 vs
# 77.8 us per layer on an H200), before counting FlashInfer's plan() (0.1-0.4 ms of host time).
TRITON_GRAPH_DECODE_MAX_BS = 128
# The q/k norm, rope and KV store inside the Triton decode kernel (forward_decode_rope);
# PYMLLM_DECODE_ROPE_FUSION=0 keeps them in their own kernel (A/B measurements, a way out).
DECODE_ROPE_FUSION = os.environ.get("PYMLLM_DECODE_ROPE_FUSION", "1") != "0"


def one_row_split_cap(model: torch.nn.Module) -> int:
    """The one-row graph's cap on the attention's KV splits: triton_decode.ROPE_MAX_SPLITS, or
    less where a layer taking the attention's output (``*o_proj``) asks for less through its
    quant method (LinearMethodBase.one_row_attention_split_cap)."""
    from pymllm.layers.attention.triton_decode import ROPE_MAX_SPLITS

    cap = ROPE_MAX_SPLITS
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if name.endswith("o_proj") and method is not None:
            cap = min(cap, method.one_row_attention_split_cap(module) or cap)
    return cap


def rope_in_attention_ok(bs: int) -> bool:
    """Whether the Triton decode graph of ``bs`` rows takes the q/k norms, rope and KV store into
    its attention kernel: the one-row graph only. Larger decode graphs also replay short extends
    as decode rows (cuda_graph_runner.extend_runs_as_decode), where a row attends to the new
    tokens of the same request's earlier rows; inside one launch their K/V stores are not ordered
    before those reads, so these graphs keep the separate q/k-norm-rope kernel, whose stores all
    land before the attention launch starts. One row has no other row to wait for."""
    return DECODE_ROPE_FUSION and bs == 1
WORKSPACE_BYTES = 256 << 20  # FlashInfer's split-kv scratch; 128 MB is its documented minimum
CUDA_CORE_DECODE_GROUP_SIZES = (1, 2, 3, 4, 8)
TENSOR_CORE_MIN_GROUP_SIZE = 4
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def decode_use_tensor_cores(num_qo_heads: int, num_kv_heads: int, kv_dtype: torch.dtype) -> bool:
    """Decode on tensor cores for fp8 KV, for GQA groups >= 4, and where CUDA cores can't."""
    group = num_qo_heads // num_kv_heads
    if kv_dtype in _FP8_DTYPES:
        return True
    return group >= TENSOR_CORE_MIN_GROUP_SIZE or group not in CUDA_CORE_DECODE_GROUP_SIZES


def graph_decode_kernel(batch_size: int, kv_dtype: torch.dtype, head_dim: int) -> str:
    """Which kernel a captured decode graph of ``batch_size`` uses: "triton" or "flashinfer".

    FlashInfer's decode must be re-planned on the host before every replay (~0.1-0.2 ms on the
    critical path of each step); the Triton kernel needs nothing, and for small batches it is
    also the faster kernel (scripts/bench_decode_attention.py). Large batches are dominated by
    streaming the KV cache, where FlashInfer's kernels are tuned further.
    """
    triton_ok = (
        kv_dtype in SUPPORTED_DTYPES
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
        and importlib.util.find_spec("triton") is not None
    )
    return "triton" if triton_ok and batch_size <= TRITON_GRAPH_DECODE_MAX_BS else "flashinfer"


def window_left_for(sliding_window: Optional[int]) -> int:
    """FlashInfer's inclusive left window: a query at p sees keys in [p - window_left, p].

    Our layers' ``sliding_window`` w means the w most recent keys including the query's own
    (the torch_native mask keeps k > p - w), hence w - 1; -1 disables the window.
    """
    return -1 if sliding_window is None else int(sliding_window) - 1


def extend_uses_ragged(prefix_lens: Sequence[int]) -> bool:
    """Ragged (new k/v only) when no sequence of the batch has KV cached before this step."""
    return all(p == 0 for p in prefix_lens)


def lens_host(lens: Sequence[int]) -> torch.Tensor:
    """Sequence lengths as the host int32 tensor plan() takes for ``seq_lens``."""
    return torch.from_numpy(np.asarray(lens, dtype=np.int32))


def attention_layers(model: "nn.Module") -> List[RadixAttention]:
    return [m for m in model.modules() if isinstance(m, RadixAttention)]


@dataclass(frozen=True)
class AttentionGeometry:
    """What plan() needs to know about the model's attention layers (uniform across layers)."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float
    window_lefts: Tuple[int, ...]  # distinct windows, -1 (full attention) included if used

    @classmethod
    def from_layers(cls, layers: Sequence[RadixAttention]) -> "AttentionGeometry":
        if not layers:
            raise ConfigError("--server.attention_backend flashinfer: the model has no attention layers")
        shapes = {(a.num_heads, a.num_kv_heads, a.head_dim, a.scaling) for a in layers}
        if len(shapes) != 1:
            raise ConfigError(
                "--server.attention_backend flashinfer: attention layers differ in heads, head_dim "
                f"or scaling ({sorted(shapes)}); use --server.attention_backend torch_native"
            )
        heads, kv_heads, head_dim, scale = shapes.pop()
        windows = tuple(sorted({window_left_for(a.sliding_window) for a in layers}))
        return cls(heads, kv_heads, head_dim, float(scale), windows)


@dataclass
class _ForwardMetadata:
    kind: str  # "decode", "triton_decode", "triton_shared_prefix", "ragged", "paged" or "cascade"
    wrappers: Dict[int, object]  # window_left -> wrapper planned for this forward
    # "cascade" only: the paged wrapper planned over the cached prefixes, and which new tokens
    # merge its result (None: all of them).
    prefix: Optional[object] = None
    merge_mask: Optional[torch.Tensor] = None
    num_splits: int = 0  # Triton kinds only: KV splits per sequence, fixed by the graph
    rope_in_attention: bool = False  # "triton_decode" only: see rope_in_attention_ok


@dataclass
class _GraphState:
    kv_indptr: torch.Tensor  # [max_bs + 1] int32
    kv_indices: torch.Tensor  # [max_num_tokens] int32
    last_page_len: torch.Tensor  # [max_bs] int32, all ones
    wrappers: Dict[int, Dict[int, object]] = field(default_factory=dict)  # bs -> window -> wrapper
    triton_splits: Dict[int, int] = field(default_factory=dict)  # bs -> splits, Triton-decoded graphs
    triton_metadata: Dict[int, "_ForwardMetadata"] = field(default_factory=dict)  # bs -> their replay metadata
    shared_prefix_splits: Dict[int, int] = field(default_factory=dict)  # bs -> splits, shared-prefix graphs
    # FlashInfer-decoded sizes whose graphs gather their own kv_indices (graph_metadata_kernels).
    kv_indices_in_graph: Set[int] = field(default_factory=set)
    # [max_bs * H_kv] int32 zeros (triton_decode.arrival_counters): the Triton decode kernel's
    # per-(sequence, KV head) arrival counters, allocated once so graphs replay on them; every
    # layer and graph shares them (one stream runs them in turn; each launch re-zeroes them).
    triton_counters: Optional[torch.Tensor] = None


def check_supported(device: torch.device, dtype: torch.dtype) -> None:
    """ConfigError unless FlashInfer has kernels for this device and dtype."""
    if device.type != "cuda":
        raise ConfigError("--server.attention_backend flashinfer: needs a CUDA device")
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(
            f"--server.attention_backend flashinfer: no kernels for {dtype} (FlashInfer has "
            "float16/bfloat16 attention); use --server.dtype bfloat16 or "
            "--server.attention_backend torch_native"
        )


class FlashInferAttnBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(self, runner, extend_strategy: Optional[str] = None):
        """extend_strategy: one of ``flashinfer_extend.EXTEND_STRATEGIES`` (None: the default)."""
        check_supported(runner.device, runner.dtype)
        self.extend_strategy = fx.check_extend_strategy(extend_strategy)
        import flashinfer

        self._fi = flashinfer
        self.device = runner.device
        self.q_dtype = runner.dtype
        self.kv_dtype = runner.kv_pool.dtype
        self.geometry = AttentionGeometry.from_layers(attention_layers(runner.model))
        self.one_row_split_cap = one_row_split_cap(runner.model)
        g = self.geometry
        if g.num_kv_heads != runner.kv_pool.num_kv_heads or g.head_dim != runner.kv_pool.head_dim:
            raise ConfigError("--server.attention_backend flashinfer: KV pool shape differs from the model's")
        self.use_tensor_cores = decode_use_tensor_cores(g.num_qo_heads, g.num_kv_heads, self.kv_dtype)
        self.req_to_token = runner.req_to_token_pool.req_to_token
        self.kv_ops = KVCacheOps(self.device, self.kv_dtype)
        # Host-side ones for kv_last_page_len: plan() reads it on the host, so a device tensor
        # would cost a device-to-host copy (and a sync) per forward. Pinned, since plan() also
        # copies it to the device every time, and from pinned memory that copy is asynchronous.
        self._ones_host = torch.ones(
            runner.req_to_token_pool.size + 1, dtype=torch.int32, pin_memory=self.device.type == "cuda"
        )
        self.workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._decode = {w: self._new_decode_wrapper() for w in g.window_lefts}
        paged_backend = fx.prefix_prefill_backend(self.extend_strategy)
        self._prefill_paged = {
            w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=paged_backend)
            for w in g.window_lefts
        }
        self._prefill_ragged = {
            w: flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD") for w in g.window_lefts
        }
        self._graph: Optional[_GraphState] = None
        self.forward_metadata: Optional[_ForwardMetadata] = None

    def supports_cuda_graph(self) -> bool:
        return True

    # ---------------- planning ----------------
    def _new_decode_wrapper(self, **graph_buffers):
        return self._fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores, **graph_buffers
        )

    def _common_plan_args(self, window_left: int) -> dict:
        return dict(
            window_left=window_left, q_data_type=self.q_dtype, kv_data_type=self.kv_dtype,
            sm_scale=self.geometry.sm_scale,
        )

    def _plan_decode(self, wrappers: Dict[int, object], indptr_host, kv_indices, bs: int, seq_lens_host) -> None:
        g = self.geometry
        for window_left, wrapper in wrappers.items():
            # seq_lens spares plan() deriving the lengths from indptr with host tensor ops.
            wrapper.plan(
                indptr_host, kv_indices, self._ones_host[:bs],
                g.num_qo_heads, g.num_kv_heads, g.head_dim, 1,
                seq_lens=seq_lens_host, **self._common_plan_args(window_left),
            )

    def _device_kv_indices(self, req_pool_indices, seq_lens, indptr_host):
        total = int(indptr_host[-1])
        kv_indptr = indptr_host.to(self.device, non_blocking=True)
        return self.kv_ops.kv_indices(self.req_to_token, req_pool_indices, seq_lens, kv_indptr, total)

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        fb = forward_batch
        bs = fb.batch_size
        g = self.geometry
        if fb.forward_mode.is_decode():
            indptr_host = indptr_from_lens(fb.seq_lens_cpu)
            kv_indices = self._device_kv_indices(fb.req_pool_indices, fb.seq_lens, indptr_host)
            self._plan_decode(self._decode, indptr_host, kv_indices, bs, lens_host(fb.seq_lens_cpu))
            self.forward_metadata = _ForwardMetadata("decode", self._decode)
            return
        qo_indptr_host = indptr_from_lens(fb.extend_seq_lens_cpu)
        kind = fx.extend_kind(self.extend_strategy, fb.extend_prefix_lens_cpu, g.window_lefts)
        if kind in ("ragged", "cascade"):
            for window_left, wrapper in self._prefill_ragged.items():
                wrapper.plan(
                    qo_indptr_host, qo_indptr_host, g.num_qo_heads, g.num_kv_heads, g.head_dim,
                    causal=True, **self._common_plan_args(window_left),
                )
            self.forward_metadata = _ForwardMetadata("ragged", self._prefill_ragged)
            if kind == "cascade":
                self._plan_cascade_prefix(fb, qo_indptr_host)
            return
        kv_indptr_host = indptr_from_lens(fb.seq_lens_cpu)
        kv_indices = self._device_kv_indices(fb.req_pool_indices, fb.seq_lens, kv_indptr_host)
        for window_left, wrapper in self._prefill_paged.items():
            wrapper.plan(
                qo_indptr_host, kv_indptr_host, kv_indices, self._ones_host[:bs],
                g.num_qo_heads, g.num_kv_heads, g.head_dim, 1,
                causal=True, **self._common_plan_args(window_left),
            )
        self.forward_metadata = _ForwardMetadata("paged", self._prefill_paged)

    def _plan_cascade_prefix(self, fb: ForwardBatch, qo_indptr_host: torch.Tensor) -> None:
        """Cascade extend: plan the paged wrapper, non-causal, over the cached prefixes only.

        The ragged wrappers are already planned (causal, new tokens only). Sequences without a
        prefix get a one-key stand-in range and are masked out of the merge
        (``flashinfer_extend``). Only models without sliding windows get here.
        """
        g = self.geometry
        prefix_lens = fb.extend_prefix_lens_cpu
        kv_indptr_host = indptr_from_lens(fx.cascade_prefix_lens(prefix_lens))
        lens = fb.extend_prefix_lens
        if not all(p > 0 for p in prefix_lens):
            lens = torch.clamp(lens, min=1)
        kv_indices = self._device_kv_indices(fb.req_pool_indices, lens, kv_indptr_host)
        prefix = self._prefill_paged[-1]
        prefix.plan(
            qo_indptr_host, kv_indptr_host, kv_indices, self._ones_host[: fb.batch_size],
            g.num_qo_heads, g.num_kv_heads, g.head_dim, 1,
            causal=False, **self._common_plan_args(-1),
        )
        self.forward_metadata = _ForwardMetadata(
            "cascade", self._prefill_ragged, prefix=prefix,
            merge_mask=fx.cascade_merge_mask(fb, int(qo_indptr_host[-1])),
        )

    # ---------------- CUDA graphs ----------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Static index buffers shared by every captured batch size.

        max_num_tokens: the most KV entries the sequences of one captured batch hold together
        (sizes kv_indices; the runner passes max_bs * context length).
        """
        if len(self._ones_host) < max_bs + 1:
            # Graph batches may have more rows than requests (short extends run one row per token).
            self._ones_host = torch.ones(max_bs + 1, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        self._graph = _GraphState(
            kv_indptr=torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
            kv_indices=torch.zeros(max_num_tokens, dtype=torch.int32, device=self.device),
            last_page_len=torch.ones(max_bs, dtype=torch.int32, device=self.device),
            triton_counters=torch.zeros(max_bs * self.geometry.num_kv_heads, dtype=torch.int32, device=self.device),
        )

    def graph_metadata_kernels(
        self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, shared_prefix: bool = False
    ) -> Optional[Callable[[], None]]:
        """The Triton graphs read req_to_token inside the graph: nothing to add. FlashInfer's
        decode reads kv_indices gathered from req_to_token, so its graphs gather them themselves
        (after their req_to_token writes, from the kv_indptr plan() copies in before replay),
        which takes a gather that needs no host-side total: mllm_kernel's."""
        st = self._graph
        if shared_prefix or bs in st.triton_splits:
            return lambda: None
        if not self.kv_ops.kv_indices_capturable:
            return None
        indptr = st.kv_indptr[: bs + 1]
        total = st.kv_indices.numel()

        def gather() -> None:
            self.kv_ops.kv_indices(self.req_to_token, req_pool_indices, seq_lens, indptr, total, st.kv_indices)

        st.kv_indices_in_graph.add(bs)
        return gather

    def supports_shared_prefix_graphs(self) -> bool:
        """Whether graphs of rows that all extend one request (a short extend run as decode rows)
        can read the request's KV once for all rows (``triton_shared_prefix.shared_prefix_attention``)
        instead of once per row."""
        return graph_decode_kernel(1, self.kv_dtype, self.geometry.head_dim) == "triton"

    def _num_sms(self) -> int:
        # (The CPU emulation in the tests has no SM count; any power-of-two split count works.)
        return torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 4

    def init_forward_metadata_capture_cuda_graph(
        self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: Sequence[int],
        shared_prefix: bool = False,
    ) -> None:
        """Create this batch size's graph-mode decode wrappers on the static buffers and plan.

        shared_prefix: the graph's rows are consecutive new tokens of one request (see
        ``supports_shared_prefix_graphs``); its attention needs no wrappers and no planning.
        """
        st = self._graph
        if st is None:
            raise RuntimeError("init_cuda_graph_state must run before capturing")
        if shared_prefix:
            from pymllm.layers.attention import triton_shared_prefix

            splits = triton_shared_prefix.shared_prefix_num_splits(self.geometry.num_kv_heads, self._num_sms())
            st.shared_prefix_splits[bs] = splits
            self.forward_metadata = _ForwardMetadata("triton_shared_prefix", {}, num_splits=splits)
            return
        if graph_decode_kernel(bs, self.kv_dtype, self.geometry.head_dim) == "triton":
            from pymllm.layers.attention import triton_decode

            rope = rope_in_attention_ok(bs)
            cap = self.one_row_split_cap if rope else triton_decode.MAX_SPLITS
            st.triton_splits[bs] = triton_decode.num_splits_for(bs, self.geometry.num_kv_heads, self._num_sms(), cap)
            self.forward_metadata = _ForwardMetadata(
                "triton_decode", {}, num_splits=st.triton_splits[bs], rope_in_attention=rope
            )
            return
        st.wrappers[bs] = {
            w: self._new_decode_wrapper(
                use_cuda_graph=True,
                paged_kv_indptr_buffer=st.kv_indptr[: bs + 1],
                paged_kv_indices_buffer=st.kv_indices,
                paged_kv_last_page_len_buffer=st.last_page_len[:bs],
            )
            for w in self.geometry.window_lefts
        }
        self.init_forward_metadata_replay_cuda_graph(bs, req_pool_indices, seq_lens, seq_lens_cpu)

    def init_forward_metadata_replay_cuda_graph(
        self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
        seq_lens_cpu: Optional[Sequence[int]], indptr_host: Optional[torch.Tensor] = None,
        seq_lens_host: Optional[torch.Tensor] = None, shared_prefix: bool = False,
    ) -> None:
        """Refill the static buffers for this (padded) batch and re-plan its wrappers.

        indptr_host / seq_lens_host: the batch's int32 indptr and lengths on the host, ideally
        pinned (the CUDA-graph runner hands over views of its staging buffer); built from the
        padded seq_lens_cpu when not given (which is needed only then).

        The graph-mode plan() copies indptr and last_page_len into the static buffers the
        wrappers were created on. kv_indices are then gathered straight into theirs, reading
        the kv_indptr that plan() just copied (same stream), so indptr needs no copy of its
        own; plan()'s copy of kv_indices onto themselves is a no-op, and its host-side
        scheduling never looks at their values.

        shared_prefix: replaying a graph captured with shared_prefix=True (nothing to plan).
        """
        st = self._graph
        if shared_prefix:
            self.forward_metadata = _ForwardMetadata(
                "triton_shared_prefix", {}, num_splits=st.shared_prefix_splits[bs]
            )
            return
        splits = st.triton_splits.get(bs)
        if splits is not None:
            # The captured kernels read req_to_token and the static seq_lens directly; the
            # metadata only describes them, the same for every replay of this size (made once:
            # this runs before every launch).
            md = st.triton_metadata.get(bs)
            if md is None:
                md = st.triton_metadata[bs] = _ForwardMetadata(
                    "triton_decode", {}, num_splits=splits, rope_in_attention=rope_in_attention_ok(bs)
                )
            self.forward_metadata = md
            return
        if indptr_host is None:
            indptr_host = indptr_from_lens(seq_lens_cpu)
        if seq_lens_host is None:
            seq_lens_host = lens_host(seq_lens_cpu)
        total = int(indptr_host[-1])
        wrappers = st.wrappers[bs]
        self._plan_decode(wrappers, indptr_host, st.kv_indices[:total], bs, seq_lens_host)
        if bs not in st.kv_indices_in_graph:
            self.kv_ops.kv_indices(
                self.req_to_token, req_pool_indices, seq_lens, st.kv_indptr[: bs + 1], total, st.kv_indices
            )
        self.forward_metadata = _ForwardMetadata("decode", wrappers)

    # ---------------- attention ----------------
    def _store(self, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention, fb: ForwardBatch, save: bool = True):
        """Store k/v at out_cache_loc unless a fused kernel already did (save=False); returns
        the layer's (k_buf, v_buf)."""
        k_buf, v_buf = fb.kv_pool.get_kv_buffer(layer.layer_id)
        if save and not self.kv_ops.try_store(k, v, k_buf, v_buf, fb.out_cache_loc):
            fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, k, v)
        return k_buf, v_buf

    def _wrapper(self, layer: RadixAttention):
        return self.forward_metadata.wrappers[window_left_for(layer.sliding_window)]

    def _attend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache: bool):
        """Store the new K/V (unless a fused kernel did), then run what this forward planned:
        the planned kind already says extend or decode and which kernel."""
        k = k.view(-1, layer.num_kv_heads, layer.head_dim)
        v = v.view(-1, layer.num_kv_heads, layer.head_dim)
        kv_buffers = self._store(k, v, layer, forward_batch, save_kv_cache)
        q = q.view(-1, layer.num_heads, layer.head_dim)
        md = self.forward_metadata
        if md.kind == "ragged":
            out = self._wrapper(layer).run(q, k, v)
        elif md.kind == "cascade":
            out = fx.run_cascade(self._fi, self._wrapper(layer), md.prefix, q, k, v, kv_buffers, md.merge_mask)
        elif md.kind == "triton_decode":
            from pymllm.layers.attention.triton_decode import decode_attention

            out = decode_attention(
                q, *kv_buffers, self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
                layer.scaling, md.num_splits, window_left_for(layer.sliding_window),
                counters=self._graph.triton_counters,
            )
        elif md.kind == "triton_shared_prefix":
            from pymllm.layers.attention.triton_shared_prefix import shared_prefix_attention

            # The merge as a second launch: merging all rows' splits in the last program leaves
            # one SM per KV head doing it (H200, Qwen3-8B heads, 32 rows on 2,000 cached tokens:
            # 43.4 us per layer that way, 16.9 us with the merge kernel; per-row decode 63.6 us).
            out = shared_prefix_attention(
                q, *kv_buffers, self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
                layer.scaling, md.num_splits, window_left_for(layer.sliding_window), separate_merge=True,
            )
        else:  # "paged" extend or FlashInfer "decode"
            out = self._wrapper(layer).run(q, kv_buffers)
        return out.view(-1, layer.num_heads * layer.head_dim)

    def forward_extend(
        self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache: bool = True
    ):
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode_rope(self, q, k, v, positions, rotary_emb, q_norm, k_norm, layer: RadixAttention,
                            forward_batch: ForwardBatch):
        """The Triton decode kernel of the one-row graph (rope_in_attention_ok) with the q/k norms,
        rope and KV store inside (pymllm.layers.attention.decode_rope): one launch per layer fewer."""
        md = self.forward_metadata
        if md.kind != "triton_decode" or not md.rope_in_attention:
            return None
        from pymllm.layers.attention.decode_rope import decode_rope
        from pymllm.layers.attention.triton_decode import ROPE_NUM_STAGES, ROPE_NUM_WARPS, decode_attention
        from pymllm.layers.fused_ops import KVCacheWrite

        k_buf, v_buf = forward_batch.kv_pool.get_kv_buffer(layer.layer_id)
        rope = decode_rope(q, k, v, positions, rotary_emb, q_norm, k_norm,
                           KVCacheWrite(v, k_buf, v_buf, forward_batch.out_cache_loc))
        if rope is None:
            return None
        out = decode_attention(
            q, k_buf, v_buf, self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens,
            layer.scaling, md.num_splits, window_left_for(layer.sliding_window),
            counters=self._graph.triton_counters, rope=rope, kv_settled=True,
            num_warps=ROPE_NUM_WARPS, num_stages=ROPE_NUM_STAGES,
        )
        return out.view(-1, layer.num_heads * layer.head_dim)

    def forward_decode(
        self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache: bool = True
    ):
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache)

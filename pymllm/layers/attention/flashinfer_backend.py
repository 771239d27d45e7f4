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
- extend on top of a cached prefix (chunked prefill, prefix-cache hits, mixed batches):
  ``BatchPrefillWithPagedKVCacheWrapper``, causal; the new tokens' K/V are written to the pool
  first, then attention runs over prefix + new tokens through kv_indices.

``plan()`` runs once per forward in ``init_forward_metadata`` and every layer reuses it.
Layers with a sliding window get their own wrapper planned with ``window_left``; all wrappers
share one float workspace buffer (they run one after another on one stream). Index arrays
that plan() reads on the host (indptr, last_page_len) are passed as host tensors built from
the batch's host-side lengths, so planning never waits for the GPU.

CUDA graphs: decode wrappers created with ``use_cuda_graph=True`` keep reading the static
kv_indptr / kv_indices / last_page_len buffers that were given at capture time. FlashInfer's
plan in graph mode fixes the launch grid and the workspace layout by batch size alone (split-kv
is always on), so re-planning before each replay with the new lengths refreshes the schedule
in the workspace without changing what the captured kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from pymllm.configs.errors import ConfigError
from pymllm.engine.forward_batch import ForwardBatch
from pymllm.layers.attention.base_backend import AttentionBackend
from pymllm.layers.kernels.kv_cache_ops import KVCacheOps, indptr_from_lens
from pymllm.layers.radix_attention import RadixAttention

if TYPE_CHECKING:
    from torch import nn

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
    kind: str  # "decode", "ragged" or "paged"
    wrappers: Dict[int, object]  # window_left -> wrapper planned for this forward


@dataclass
class _GraphState:
    kv_indptr: torch.Tensor  # [max_bs + 1] int32
    kv_indices: torch.Tensor  # [max_num_tokens] int32
    last_page_len: torch.Tensor  # [max_bs] int32, all ones
    wrappers: Dict[int, Dict[int, object]] = field(default_factory=dict)  # bs -> window -> wrapper


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

    def __init__(self, runner):
        check_supported(runner.device, runner.dtype)
        import flashinfer

        self._fi = flashinfer
        self.device = runner.device
        self.q_dtype = runner.dtype
        self.kv_dtype = runner.kv_pool.dtype
        self.geometry = AttentionGeometry.from_layers(attention_layers(runner.model))
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
        self._prefill_paged = {
            w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD") for w in g.window_lefts
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
        if extend_uses_ragged(fb.extend_prefix_lens_cpu):
            for window_left, wrapper in self._prefill_ragged.items():
                wrapper.plan(
                    qo_indptr_host, qo_indptr_host, g.num_qo_heads, g.num_kv_heads, g.head_dim,
                    causal=True, **self._common_plan_args(window_left),
                )
            self.forward_metadata = _ForwardMetadata("ragged", self._prefill_ragged)
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

    # ---------------- CUDA graphs ----------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Static index buffers shared by every captured batch size.

        max_num_tokens: the most KV entries the sequences of one captured batch hold together
        (sizes kv_indices; the runner passes max_bs * context length).
        """
        self._graph = _GraphState(
            kv_indptr=torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
            kv_indices=torch.zeros(max_num_tokens, dtype=torch.int32, device=self.device),
            last_page_len=torch.ones(max_bs, dtype=torch.int32, device=self.device),
        )

    def init_forward_metadata_capture_cuda_graph(
        self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: Sequence[int]
    ) -> None:
        """Create this batch size's graph-mode decode wrappers on the static buffers and plan."""
        st = self._graph
        if st is None:
            raise RuntimeError("init_cuda_graph_state must run before capturing")
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
        self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, seq_lens_cpu: Sequence[int],
        indptr_host: Optional[torch.Tensor] = None, seq_lens_host: Optional[torch.Tensor] = None,
    ) -> None:
        """Refill the static buffers for this (padded) batch and re-plan its wrappers.

        indptr_host / seq_lens_host: the batch's int32 indptr and lengths on the host, ideally
        pinned (the CUDA-graph runner hands over views of its staging buffer); built from
        seq_lens_cpu when not given.

        The graph-mode plan() copies indptr and last_page_len into the static buffers the
        wrappers were created on. kv_indices are then gathered straight into theirs, reading
        the kv_indptr that plan() just copied (same stream), so indptr needs no copy of its
        own; plan()'s copy of kv_indices onto themselves is a no-op, and its host-side
        scheduling never looks at their values.
        """
        st = self._graph
        if indptr_host is None:
            indptr_host = indptr_from_lens(seq_lens_cpu)
        if seq_lens_host is None:
            seq_lens_host = lens_host(seq_lens_cpu)
        total = sum(seq_lens_cpu)
        wrappers = st.wrappers[bs]
        self._plan_decode(wrappers, indptr_host, st.kv_indices[:total], bs, seq_lens_host)
        self.kv_ops.kv_indices(
            self.req_to_token, req_pool_indices, seq_lens, st.kv_indptr[: bs + 1], total, st.kv_indices
        )
        self.forward_metadata = _ForwardMetadata("decode", wrappers)

    # ---------------- attention ----------------
    def _store(self, k: torch.Tensor, v: torch.Tensor, layer: RadixAttention, fb: ForwardBatch):
        k_buf, v_buf = fb.kv_pool.get_kv_buffer(layer.layer_id)
        if not self.kv_ops.try_store(k, v, k_buf, v_buf, fb.out_cache_loc):
            fb.kv_pool.set_kv(layer.layer_id, fb.out_cache_loc, k, v)
        return k_buf, v_buf

    def _wrapper(self, layer: RadixAttention):
        return self.forward_metadata.wrappers[window_left_for(layer.sliding_window)]

    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch):
        k = k.view(-1, layer.num_kv_heads, layer.head_dim)
        v = v.view(-1, layer.num_kv_heads, layer.head_dim)
        kv_buffers = self._store(k, v, layer, forward_batch)
        q = q.view(-1, layer.num_heads, layer.head_dim)
        if self.forward_metadata.kind == "ragged":
            out = self._wrapper(layer).run(q, k, v)
        else:
            out = self._wrapper(layer).run(q, kv_buffers)
        return out.view(-1, layer.num_heads * layer.head_dim)

    def forward_decode(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch):
        k = k.view(-1, layer.num_kv_heads, layer.head_dim)
        v = v.view(-1, layer.num_kv_heads, layer.head_dim)
        kv_buffers = self._store(k, v, layer, forward_batch)
        out = self._wrapper(layer).run(q.view(-1, layer.num_heads, layer.head_dim), kv_buffers)
        return out.view(-1, layer.num_heads * layer.head_dim)

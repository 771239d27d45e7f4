"""Prefill CUDA graphs, piecewise: a prefill's whole forward but its attention, replayed.

Why: an eager prefill launches every layer op by op from Python. On the H100 host that is
0.6-1 ms of host time per layer (T172/T174: 18-31 ms for Qwen3-0.6B's 28 layers at 1k tokens,
against ~3 ms of GPU work), so on a small model, or on Jetson's slower cores, the host sets the
time to first token. The decode graphs already take extends of up to 32 new tokens
(``extend_runs_as_decode``); this covers the prompts past them.

How: everything between two attentions (o_proj, the residual adds and norms, the MLP, the next
layer's qkv projection, its q/k norms and rope and the KV store) works token by token, so it
does not care how the tokens split into requests. It is captured once per token-count bucket,
as one graph per piece: layers + 1 graphs per bucket. Attention, which does care, runs eagerly
between the pieces on the real tokens, with the metadata the backend planned for the batch as
it does for an eager forward, so every backend and every extend shape (prefix-cache hits,
chunked prefill, mixed batches) works unchanged.

Capturing runs the model's own forward with a stand-in for the attention backend
(``_AttentionBreak``): at each attention it copies q, k and v into static buffers, ends the
piece's graph and starts the next, and hands back a static buffer that the replay fills with the
real attention's output. All pieces of all buckets share one memory pool and are replayed in
capture order, which is what makes sharing it safe. A batch of n tokens is padded to its bucket
T: padding rows read token 0 at position 0 and store their K/V in slot 0, which the allocator
never hands out (as the decode graphs' padding rows do), and nothing reads their outputs.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import torch

from pymllm.engine.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from pymllm.executor.model_runner import ModelRunner
    from pymllm.layers.radix_attention import RadixAttention

logger = logging.getLogger(__name__)

# Extends of up to EXTEND_AS_DECODE_MAX_TOKENS (32) tokens mostly replay the decode graphs; the
# smallest bucket takes 33-47 tokens and the short extends the decode rows cannot (KV re-reads).
SMALLEST_BUCKET = 48
# Four buckets per doubling: padding wastes at most a quarter of a bucket's GPU work.
_STEPS_PER_OCTAVE = 4


def prefill_token_buckets(max_tokens: int) -> List[int]:
    """Token counts captured for ``--server.prefill_cuda_graph_max_tokens``: from 48 in steps of a
    quarter of the power of two below (48, 56, 64, 80, 96, 112, 128, 160, ...), multiples of 8,
    up to max_tokens, which is always the last; [] when max_tokens is 0."""
    if max_tokens <= 0:
        return []
    buckets, t = [], SMALLEST_BUCKET
    while t < max_tokens:
        buckets.append(t)
        step = max(8, (1 << (t.bit_length() - 1)) // _STEPS_PER_OCTAVE)
        t += step
    return buckets + [max_tokens]


def bucket_for(num_tokens: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket >= num_tokens, or None past the largest."""
    i = bisect.bisect_left(buckets, num_tokens)
    return buckets[i] if i < len(buckets) else None


@dataclass
class StaticPrefillInputs:
    """Inputs and the attention's operands for every bucket: rows [0, T) are bucket T's."""

    input_ids: torch.Tensor  # [max_tokens] int64
    positions: torch.Tensor  # [max_tokens] int64
    out_cache_loc: torch.Tensor  # [max_tokens] int64; padding rows store their K/V in slot 0
    # q, k, v as each piece leaves them for its attention, and that attention's output; shaped
    # at the first attention of the first capture (the model's widths and dtype).
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    attn_out: Optional[torch.Tensor] = None

    @classmethod
    def allocate(cls, max_tokens: int, device: torch.device) -> "StaticPrefillInputs":
        def zeros() -> torch.Tensor:
            return torch.zeros(max_tokens, dtype=torch.int64, device=device)

        return cls(zeros(), zeros(), zeros())

    def ensure_attention_buffers(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.q is not None:
            return
        rows, device = self.input_ids.shape[0], self.input_ids.device
        # Plain tensors even when the first capture runs in inference mode: the replay updates
        # them in place, and only plain tensors may be updated both inside and outside it.
        with torch.inference_mode(False):
            self.q = torch.zeros(rows, q.shape[-1], dtype=q.dtype, device=device)
            self.k = torch.zeros(rows, k.shape[-1], dtype=k.dtype, device=device)
            self.v = torch.zeros(rows, v.shape[-1], dtype=v.dtype, device=device)
            # Zeros, so that the padding rows, which no attention writes, hold finite values.
            self.attn_out = torch.zeros_like(self.q)

    def stage(self, fb: ForwardBatch, bucket: int) -> None:
        """Copy a batch's tokens, positions and slots into rows [0, n) and reset the padding
        rows [n, bucket) to token 0, position 0, slot 0 (a previous, longer batch left its own)."""
        n = fb.input_ids.shape[0]
        for static, real in ((self.input_ids, fb.input_ids), (self.positions, fb.positions),
                             (self.out_cache_loc, fb.out_cache_loc)):
            static[:n].copy_(real)
            if n < bucket:
                static[n:bucket].zero_()


class _AttentionBreak:
    """The attention backend while pieces run on the static buffers: each attention leaves its
    q, k and v in them and returns the static output buffer; ``on_break`` then decides what
    happens between the pieces (a capture ends one graph and begins the next)."""

    def __init__(self, statics: StaticPrefillInputs, on_break: Callable[["RadixAttention", bool], None]):
        self.statics = statics
        self.on_break = on_break

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: "RadixAttention",
                forward_batch: ForwardBatch, save_kv_cache: bool = True) -> torch.Tensor:
        s = self.statics
        s.ensure_attention_buffers(q, k, v)
        rows = q.shape[0]
        s.q[:rows].copy_(q)  # RadixAttention hands them over as [rows, heads * head_dim]
        s.k[:rows].copy_(k)
        s.v[:rows].copy_(v)
        self.on_break(layer, save_kv_cache)
        return s.attn_out[:rows]


@dataclass
class CapturedBucket:
    """One bucket's pieces: ``graphs[i]`` runs up to attention ``i`` (``attentions[i]``: the
    layer and whether the backend still stores its K/V), the last graph from the last attention
    to the final norm, whose output is ``hidden`` [T, hidden]."""

    graphs: list = field(default_factory=list)
    attentions: List[Tuple["RadixAttention", bool]] = field(default_factory=list)
    hidden: Optional[torch.Tensor] = None


class PrefillGraphs:
    """Piecewise prefill graphs of a model with ``hidden_states(input_ids, positions, batch)`` (the
    decoder's output, which ``logits(hidden, batch)`` turns into the step's logits)."""

    def __init__(self, model: torch.nn.Module, kv_pool, buckets: Sequence[int], device: torch.device,
                 graph_factory: Optional[Callable[[], object]] = None):
        if not buckets:
            raise ValueError("PrefillGraphs needs at least one bucket")
        self.model = model
        self.kv_pool = kv_pool
        self.buckets = list(buckets)
        self.device = device
        self.statics = StaticPrefillInputs.allocate(self.buckets[-1], device)
        self.captured: dict = {}
        self._graph_factory = graph_factory or torch.cuda.CUDAGraph
        self._stream = None  # the capture stream (CUDA captures only off the default stream)
        self.pool = None

    # ---------------- which batches ----------------
    def bucket_of(self, fb: ForwardBatch) -> Optional[int]:
        """The bucket that runs ``fb``, or None when it runs eagerly: decode batches, image
        prompts (3-D positions, vision embeddings) and batches past the largest bucket."""
        if fb.forward_mode.is_decode() or fb.positions.dim() != 1 or fb.extras.get("mm") is not None:
            return None
        return bucket_for(fb.input_ids.shape[0], self.buckets)

    # ---------------- capture ----------------
    def _static_batch(self, bucket: int, backend: _AttentionBreak) -> ForwardBatch:
        s = self.statics
        one = s.input_ids[:1]
        return ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=1,
            input_ids=s.input_ids[:bucket], positions=s.positions[:bucket], req_pool_indices=one,
            seq_lens=one, out_cache_loc=s.out_cache_loc[:bucket], seq_lens_cpu=[bucket],
            kv_pool=self.kv_pool, attn_backend=backend,
        )

    def run_pieces(self, bucket: int, on_break: Callable[["RadixAttention", bool], None]) -> torch.Tensor:
        """The model's forward over the static rows [0, bucket), attention replaced by
        ``on_break``; returns the final hidden states [bucket, hidden]."""
        fb = self._static_batch(bucket, _AttentionBreak(self.statics, on_break))
        return self.model.hidden_states(fb.input_ids, fb.positions, fb)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that the smaller ones reuse its memory."""
        start = time.perf_counter()
        on_cuda = self.device.type == "cuda"
        mem_before = torch.cuda.memory_reserved(self.device) if on_cuda else 0
        if on_cuda:
            self._stream = torch.cuda.Stream(self.device)
            self.pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self._capture_bucket(bucket)
        mem = torch.cuda.memory_reserved(self.device) - mem_before if on_cuda else 0
        logger.info(
            "Captured prefill CUDA graphs for %d token counts (%d..%d, %d pieces each) in %.2f s, %.0f MiB",
            len(self.buckets), self.buckets[0], self.buckets[-1], len(self.captured[self.buckets[0]].graphs),
            time.perf_counter() - start, mem / 2**20,
        )

    def _capture_bucket(self, bucket: int) -> None:
        logger.info("Capturing prefill CUDA graphs: %d tokens", bucket)
        # The warm-up builds Triton / JIT kernels and lazy caches, none of which may happen while
        # capturing; its attention breaks do nothing.
        self.run_pieces(bucket, lambda layer, save: None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        entry = CapturedBucket()
        graph = None

        def next_piece(layer: "RadixAttention", save_kv_cache: bool) -> None:
            nonlocal graph
            graph.capture_end()
            entry.attentions.append((layer, save_kv_cache))
            graph = self._begin(entry)

        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            graph = self._begin(entry)
            entry.hidden = self.run_pieces(bucket, next_piece)
            graph.capture_end()
        self.captured[bucket] = entry

    def _begin(self, entry: CapturedBucket):
        graph = self._graph_factory()
        graph.capture_begin(pool=self.pool)
        entry.graphs.append(graph)
        return graph

    # ---------------- replay ----------------
    def run(self, fb: ForwardBatch, bucket: int) -> torch.Tensor:
        """The final hidden states [n, hidden] of ``fb`` (n tokens, ``bucket_of(fb)`` given), its
        attention metadata already planned by the backend (init_forward_metadata). Valid until
        the next run."""
        n = fb.input_ids.shape[0]
        entry = self.captured[bucket]
        s = self.statics
        s.stage(fb, bucket)
        backend = fb.attn_backend
        q, k, v, attn_out = s.q[:n], s.k[:n], s.v[:n], s.attn_out[:n]  # views made once, not per layer
        for graph, (layer, save_kv_cache) in zip(entry.graphs, entry.attentions):
            graph.replay()
            attn_out.copy_(backend.forward(q, k, v, layer, fb, save_kv_cache=save_kv_cache).reshape(n, -1))
        entry.graphs[-1].replay()
        return entry.hidden[:n]


def prefill_graphs_disabled_reason(runner: "ModelRunner") -> Optional[str]:
    """Why prefills run eagerly, or None when piecewise prefill graphs should be captured."""
    server = runner.server
    if server.prefill_cuda_graph_max_tokens == 0:
        return "--server.prefill_cuda_graph_max_tokens 0"
    if server.disable_cuda_graph:
        return "--server.disable_cuda_graph"
    if runner.device.type != "cuda":
        return f"device is {runner.device.type}"
    if not (hasattr(runner.model, "hidden_states") and hasattr(runner.model, "logits")):
        return f"{type(runner.model).__name__} has no piecewise prefill (hidden_states and logits)"
    return None


def build_prefill_graphs(runner: "ModelRunner") -> Optional[PrefillGraphs]:
    """Captured PrefillGraphs for the runner's model, or None (logged) when prefill stays eager."""
    reason = prefill_graphs_disabled_reason(runner)
    if reason is not None:
        logger.info("Prefill CUDA graphs off: %s", reason)
        return None
    # A prefill step never holds more than max_prefill_tokens tokens.
    max_tokens = min(runner.server.prefill_cuda_graph_max_tokens, runner.server.max_prefill_tokens)
    graphs = PrefillGraphs(runner.model, runner.kv_pool, prefill_token_buckets(max_tokens), runner.device)
    try:
        graphs.capture()
    except Exception as e:  # add the way out to whatever broke the capture
        raise RuntimeError(
            f"prefill CUDA graph capture failed: {e}; --server.prefill_cuda_graph_max_tokens 0 prefills eagerly"
        ) from e
    return graphs

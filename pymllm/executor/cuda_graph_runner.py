"""Decode-step CUDA graphs: capture once per batch-size bucket, replay with padding.

A small-batch decode step is dominated by kernel launches (a few dozen per layer), not by the
GPU work itself; replaying a captured graph issues the whole step with one launch. Graphs are
captured for the batch sizes of ``capture_batch_sizes`` and a real batch is padded up to the
next captured size. Padding sequences read and write only reserved memory: the request pool's
all-zero padding row (so their single KV entry is slot 0) and KV slot 0, which the allocator
never hands out.

Every captured graph reads its inputs from one set of static buffers (sliced to its batch
size), all views of one device buffer. ModelRunner.build_forward_batch pads a decode batch on
the host and fills them with a single copy (``stage``); replay then lets the attention backend
refresh its own static metadata (``init_forward_metadata_replay_cuda_graph``) and replays.
The graph itself records the batch's new slots in req_to_token (and, where the backend allows,
builds the attention metadata that reads them), and ends with the argmax that greedy sampling
reads. That argmax also writes the ids into the static input tokens (``feed``) and into the host
ring row the step reserved (``Readback``; the row number is one of the uploaded words), so when
the next step continues this one (overlapped decoding), nothing runs on the GPU between the two
graphs but the upload of the next step's other words: no device-to-host copy of the ids, no
copy of them into the input tokens. Per step the host issues one copy, one graph launch and an
event, since on the hosts we measured each CUDA call costs tens of microseconds of a decode
step's host time.

Right after a decode step's launch, while the GPU runs it, the host packs the step that most
likely follows (the same requests one token further, ``predict_next``); when that step comes,
only its sampled tokens and new KV slots are written into those words, and its graph is launched
right there, before the Python objects that describe the batch are built (``stage_next``; the
forward that follows finds it running).
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pymllm.engine.forward_batch import ForwardBatch, ForwardMode
from pymllm.layers.fused_ops import float_logits_argmax
from pymllm.layers.kernels.gemv_dispatch import GEMV_MAX_ROWS
from pymllm.executor.batch_inputs import (
    GraphPacker,
    HostBatch,
    StaticWordsUpload,
    ViewCache,
    next_decode_host_batch,
)
from pymllm.executor.graph_inputs import GraphInputs, NextDecode, StagedDecode

if TYPE_CHECKING:
    from pymllm.configs.server_config import ServerConfig
    from pymllm.executor.model_runner import ModelRunner
    from pymllm.orchestrator.schedule_batch import ScheduledBatch

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> List[int]:
    """[1, 2, 4, 8, 12, 16, 24, 32, ..., 256 in steps of 8, then steps of 16] up to max_bs.

    max_bs itself is always included, so every batch the scheduler can form has a graph.
    """
    sizes = [1, 2, 4, 8, 12, 16] + list(range(24, 257, 8))
    if max_bs > 256:
        sizes += list(range(272, max_bs + 1, 16))
    return [s for s in sizes if s < max_bs] + [max_bs]


def padded_batch_size(bs: int, sizes: Sequence[int]) -> int:
    """The smallest captured size >= bs (sizes ascending); ValueError past the largest."""
    i = bisect.bisect_left(sizes, bs)
    if i == len(sizes):
        raise ValueError(f"batch size {bs} exceeds the largest captured CUDA graph ({sizes[-1]})")
    return sizes[i]


# Short extends (a new turn on a cached prefix) replay the decode graphs with one row per new
# token (batch_inputs.extend_as_decode_rows): up to this many new tokens, and as long as the
# rows' attention re-reads of the shared prefix (one per row, mostly from L2) stay this small.
EXTEND_AS_DECODE_MAX_TOKENS = 32
EXTEND_AS_DECODE_MAX_KV_READS = 32 * 8192


def graph_max_batch_size(server: "ServerConfig") -> int:
    """The largest captured batch: --server.cuda_graph_max_bs when set, else
    max_running_requests but at least EXTEND_AS_DECODE_MAX_TOKENS, so short extends fit."""
    if server.cuda_graph_max_bs:
        return min(server.cuda_graph_max_bs, max(server.max_running_requests, EXTEND_AS_DECODE_MAX_TOKENS))
    return max(server.max_running_requests, EXTEND_AS_DECODE_MAX_TOKENS)


def extend_runs_as_decode(num_new_tokens: int, max_seq_len: int, has_images: bool, graph_max_bs: int,
                          shared_prefix: bool = False) -> bool:
    """Whether an extend batch replays a decode graph, one row per new token. The KV re-read
    limit only concerns per-row graphs: a shared-prefix graph reads the request's KV once."""
    return (
        not has_images  # image tokens need the vision tower and 3-D positions
        and 0 < num_new_tokens <= min(EXTEND_AS_DECODE_MAX_TOKENS, graph_max_bs)
        and (shared_prefix or num_new_tokens * max_seq_len <= EXTEND_AS_DECODE_MAX_KV_READS)
    )


def cuda_graph_disabled_reason(server: "ServerConfig", device: torch.device, attn_backend) -> Optional[str]:
    """Why decode runs eagerly, or None when CUDA graphs should be captured."""
    if server.disable_cuda_graph:
        return "--server.disable_cuda_graph"
    if device.type != "cuda":
        return f"device is {device.type}"
    if not attn_backend.supports_cuda_graph():
        return f"attention backend {attn_backend.name} does not support CUDA graphs"
    return None


def padded_seq_lens_cpu(seq_lens_cpu: Sequence[int], padded_bs: int) -> List[int]:
    return list(seq_lens_cpu) + [1] * (padded_bs - len(seq_lens_cpu))


class CudaGraphRunner:
    def __init__(self, model_runner: "ModelRunner"):
        self.runner = model_runner
        self.model = model_runner.model
        self.backend = model_runner.attn_backend
        self.device = model_runner.device
        self.padding_row = model_runner.req_to_token_pool.padding_row
        self.max_bs = graph_max_batch_size(model_runner.server)
        self.batch_sizes = capture_batch_sizes(self.max_bs)
        context_len = model_runner.req_to_token_pool.max_context_len
        self._req_to_token_flat = model_runner.req_to_token_pool.req_to_token.view(-1)
        # Plain tensors (not inference tensors): replay updates them in place, and only plain
        # tensors may be updated both inside and outside torch.inference_mode().
        self.inputs = GraphInputs.allocate(self.max_bs, self.device, self.padding_row, context_len)
        self._packer = GraphPacker(self.inputs.layout, self.padding_row, context_len)
        self._upload = StaticWordsUpload(self.inputs.words, len(self._packer.words), model_runner.stager.current_stream,
                                         token_words=self.inputs.layout.segments["input_ids"].words)
        self._readback = model_runner.readback
        self._readback_word = self.inputs.layout.segments["readback_slot"].offset
        # (shared_prefix, padded bs) of the graph whose argmax wrote the static input tokens last,
        # None once an upload has overwritten them: a step that continues that graph's rows needs
        # no token upload or copy then.
        self._fed_by: Optional[Tuple[bool, int]] = None
        # The Readback row the last replay's argmax wrote (None: the scratch row).
        self.last_readback_slot: Optional[int] = None
        # The next decode step, packed in the shadow of the running one (predict_next).
        self._next_packer = GraphPacker(self.inputs.layout, self.padding_row, context_len)
        self._next: Optional[NextDecode] = None
        self._predict_from: Optional[HostBatch] = None
        self.backend.init_cuda_graph_state(self.max_bs, self.max_bs * context_len)
        self._staged: Optional[StagedDecode] = None
        # (bs, shared_prefix) -> the backend's in-graph metadata kernels, or None when that graph's
        # req_to_token writes run eagerly before replay (graph_metadata_kernels).
        self._prologues: Dict[Tuple[int, bool], Optional[Callable[[], None]]] = {}
        # Slices of the static buffers, the staging buffers and the outputs per size, made once.
        self._views = ViewCache(limit=1024)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        # bs -> (float32 logits [bs, vocab], their argmax [bs]), written by each replay
        self.outputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        # A short extend of one request runs as rows that all read that request's KV: graphs of
        # their own, whose attention reads the shared prefix once instead of once per row.
        shared_ok = getattr(self.backend, "supports_shared_prefix_graphs", lambda: False)()
        self.shared_prefix_sizes = [
            s for s in self.batch_sizes if 2 <= s <= EXTEND_AS_DECODE_MAX_TOKENS
        ] if shared_ok else []
        self.shared_graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.shared_outputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        # Every graph ends by casting its logits and taking their argmax in one kernel (whose
        # arrival counters these are), so greedy sampling launches nothing of its own.
        self._argmax_counters = torch.zeros(self.max_bs, dtype=torch.int32, device=self.device)

    def _sliced(self, bs: int) -> Dict[str, torch.Tensor]:
        names = ("input_ids", "positions", "req_pool_indices", "seq_lens", "out_cache_loc",
                 "mrope_position_deltas", "kv_write_index", "kv_write_loc")
        return self._views.get(("static", bs), lambda: {name: getattr(self.inputs, name)[:bs] for name in names})

    def _static_batch(self, bs: int, seq_lens_cpu: Sequence[int], with_mrope: bool = True) -> ForwardBatch:
        r = self.runner
        v = self._sliced(bs)
        return ForwardBatch(
            forward_mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=v["input_ids"],
            positions=v["positions"],
            req_pool_indices=v["req_pool_indices"],
            seq_lens=v["seq_lens"],
            out_cache_loc=v["out_cache_loc"],
            seq_lens_cpu=list(seq_lens_cpu),
            req_to_token_pool=r.req_to_token_pool,
            kv_pool=r.kv_pool,
            attn_backend=self.backend,
            mrope_position_deltas=v["mrope_position_deltas"] if with_mrope else None,
        )

    def _write_req_to_token(self, bs: int) -> None:
        v = self._sliced(bs)
        self._req_to_token_flat.index_copy_(0, v["kv_write_index"], v["kv_write_loc"])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first so the smaller graphs reuse its memory."""
        start = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        # Frozen objects are skipped by the gc.collect() that each capture starts with.
        gc.collect()
        gc.freeze()
        try:
            for bs in reversed(self.batch_sizes):
                logger.info("Capturing CUDA graphs: bs=%d", bs)
                self._capture_one(bs)
            for bs in reversed(self.shared_prefix_sizes):
                logger.info("Capturing CUDA graphs: bs=%d, rows of one request's extend", bs)
                self._capture_one(bs, shared_prefix=True)
        finally:
            gc.unfreeze()
        logger.info(
            "Captured %d CUDA graphs (bs %d..%d, %d of them for short extends) in %.2f s",
            len(self.batch_sizes) + len(self.shared_prefix_sizes), self.batch_sizes[0], self.max_bs,
            len(self.shared_prefix_sizes), time.perf_counter() - start,
        )

    def prepare_capture(self, bs: int, shared_prefix: bool = False) -> ForwardBatch:
        """The static batch of size bs (all padding) with its graph-mode attention metadata;
        also asks the backend which of its metadata kernels the graph should run."""
        fb = self._static_batch(bs, [1] * bs)
        extra = {"shared_prefix": True} if shared_prefix else {}
        self.backend.init_forward_metadata_capture_cuda_graph(
            bs, fb.req_pool_indices, fb.seq_lens, fb.seq_lens_cpu, **extra
        )
        self._prologues[(bs, shared_prefix)] = self.backend.graph_metadata_kernels(
            bs, fb.req_pool_indices, fb.seq_lens, **extra
        )
        return fb

    def run_static(self, bs: int, shared_prefix: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """What the graph of size bs runs (prepare_capture first), on the static buffers: the
        rows' req_to_token writes and the backend's metadata kernels where they belong in the
        graph, the forward, float32 logits and their argmax (what greedy sampling reads, with no
        launch of its own). The argmax also writes the ids into the static input tokens and into
        the Readback ring row named by the ``readback_slot`` word. Captured once per size; the
        CPU tests run it eagerly."""
        fb = self._static_batch(bs, [1] * bs)
        prologue = self._prologues[(bs, shared_prefix)]
        if prologue is not None:
            self._write_req_to_token(bs)
            prologue()
        return self.argmax_tail(self.model(fb.input_ids, fb.positions, fb), bs)

    def argmax_tail(self, raw: torch.Tensor, bs: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """A graph's last kernel: float32 logits and their argmax, which also goes into the static
        input tokens and the Readback row named by the ``readback_slot`` word."""
        return float_logits_argmax(raw, self._argmax_counters, feed=self.inputs.input_ids[:bs],
                                   mirror=(self._readback.ring, self.inputs.readback_slot))

    def _capture_one(self, bs: int, shared_prefix: bool = False) -> None:
        self.prepare_capture(bs, shared_prefix)
        # The warm-up runs compile Triton / JIT kernels and fill lazily built caches, none of
        # which may happen during capture; they also make the measured kernel choices: the first
        # picks GEMV or GEMM per matmul, a second (GEMV-sized batches only) whether a fused
        # prologue GEMV beats its separate kernels, which needs the first choice made.
        for _ in range(2 if bs <= GEMV_MAX_ROWS else 1):
            self.run_static(bs, shared_prefix)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.run_static(bs, shared_prefix)
        (self.shared_graphs if shared_prefix else self.graphs)[bs] = graph
        (self.shared_outputs if shared_prefix else self.outputs)[bs] = out

    def fits(self, bs: int) -> bool:
        return bs <= self.max_bs

    def has_shared_prefix_graph(self, num_rows: int) -> bool:
        """Whether ``num_rows`` rows that all extend one request have a shared-prefix graph."""
        return self.fits(num_rows) and padded_batch_size(num_rows, self.batch_sizes) in self.shared_prefix_sizes

    def can_run(self, fb: ForwardBatch) -> bool:
        return (
            fb.forward_mode.is_decode()
            and self.fits(fb.batch_size)
            and fb.positions.dim() == 1
        )

    def stage(self, hb: HostBatch, shared_prefix: bool = False, decode: bool = False,
              device_tokens: Optional[torch.Tensor] = None) -> ForwardBatch:
        """Pad a decode batch on the host and copy it into the static buffers with one copy;
        returns the batch (rows [0, bs) of the static buffers). Its req_to_token writes run in
        the graph, or here when that graph's metadata is built before replay.
        shared_prefix: the rows all extend one request (``has_shared_prefix_graph``).
        decode: the rows are requests' decode steps, so the replay may pack the step after it
        (``predict_next``); extends run as rows are not.
        device_tokens: the rows' input tokens on the device, copied in before the replay (the
        host's are placeholders).
        """
        padded_bs = padded_batch_size(hb.batch_size, self.batch_sizes)
        return self._stage_words(hb, padded_bs, self._packer.pack(hb, padded_bs), shared_prefix, decode,
                                 device_tokens=device_tokens)

    def stage_next(self, batch: "ScheduledBatch", device_tokens: Optional[torch.Tensor] = None
                   ) -> Optional[ForwardBatch]:
        """Stage a decode batch from the words predict_next packed while the previous step ran,
        when the batch is that prediction: the same requests (by request row, in order) at the
        predicted positions; only its tokens and new KV slots are written now, so the words are
        exactly what ``stage`` would pack (test_next_decode_staging checks it), and the step is
        launched at once: its forward (``replay``) returns the outputs of that run. None
        otherwise, with nothing staged; every batch built after a prediction ends it, used or not.
        device_tokens: as for ``stage``."""
        nxt, self._next = self._next, None
        if nxt is None or not batch.mode.is_decode():
            return None
        reqs = batch.reqs
        if [r.req_pool_idx for r in reqs] != nxt.rows or list(batch.prefix_lens) != nxt.positions:
            return None
        tokens = [0] * len(reqs) if device_tokens is not None else [r.output_ids[-1] for r in reqs]
        words = self._next_packer.set_new_tokens(tokens, batch.out_cache_loc)
        # Nothing is left to decide about this step, so it goes to the GPU before the objects
        # that describe it are made; the forward that follows finds it running (replay).
        return self._stage_words(nxt.hb, nxt.padded_bs, words, decode=True, launch=True,
                                 device_tokens=device_tokens)

    def predict_next(self) -> None:
        """Pack the decode step that follows the one just staged with ``decode=True`` (same
        requests, one token further), for stage_next. Called right after that step's graph
        launch: this host work then overlaps the GPU instead of preceding the next launch."""
        hb, self._predict_from = self._predict_from, None
        if hb is None:
            return
        nxt = next_decode_host_batch(hb)
        padded_bs = padded_batch_size(hb.batch_size, self.batch_sizes)
        self._next_packer.pack(nxt, padded_bs)
        self._next = NextDecode(hb.req_pool_indices.tolist(), nxt.positions.tolist(), nxt, padded_bs)

    def tokens_fed(self, padded_bs: int, shared_prefix: bool, device_tokens: Optional[torch.Tensor]) -> bool:
        """Whether the static input tokens already hold ``device_tokens``: they are the ids of
        the last replay, which was of the graph this step replays, and no upload came since."""
        if device_tokens is None or shared_prefix or self._fed_by != (False, padded_bs):
            return False
        ids = self.outputs[padded_bs][1]
        return device_tokens.data_ptr() == ids.data_ptr() and device_tokens.numel() <= ids.numel()

    def _stage_words(self, hb: HostBatch, padded_bs: int, words, shared_prefix: bool = False,
                     decode: bool = False, launch: bool = False,
                     device_tokens: Optional[torch.Tensor] = None) -> ForwardBatch:
        """Upload packed words (zeros in their ``readback_slot`` word) into the static buffers;
        ``launch``: also replay the graph now. A decode step's words name a Readback row reserved
        for it; the others leave the scratch row."""
        bs = hb.batch_size
        self._predict_from = hb if decode else None
        readback_slot = None
        if decode:
            readback_slot = self._readback.reserve()
            words[self._readback_word] = readback_slot
        if self.tokens_fed(padded_bs, shared_prefix, device_tokens):
            host = self._upload.upload(words, keep_tokens=True)
            device_tokens = None
        else:
            host = self._upload.upload(words)
            self._fed_by = None
        if self._prologues.get((padded_bs, shared_prefix)) is None:
            self._write_req_to_token(bs)
        kv_indptr_host, seq_lens_host = self._host_views(host, padded_bs)
        staged = StagedDecode(
            batch=None, padded_bs=padded_bs, kv_indptr_host=kv_indptr_host, seq_lens_host=seq_lens_host,
            shared_prefix=shared_prefix, device_tokens=device_tokens, readback_slot=readback_slot,
        )
        if launch:
            self._launch(staged)
        staged.batch = self._static_batch(bs, hb.seq_lens.tolist(), with_mrope=hb.mrope_position_deltas is not None)
        self._staged = staged
        return staged.batch

    def _host_views(self, host: torch.Tensor, padded_bs: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """kv_indptr and seq_lens of a staging buffer (one of a few, reused), sliced to padded_bs."""
        def make() -> Tuple[torch.Tensor, torch.Tensor]:
            full = self.inputs.layout.torch_views(host, host_only=True)
            return full["kv_indptr"][: padded_bs + 1], full["seq_lens_host"][:padded_bs]

        return self._views.get(("host", host.data_ptr(), padded_bs), make)

    def prepare_replay(self, fb: ForwardBatch) -> int:
        """Load a decode batch into the static buffers and metadata; returns the padded size."""
        return self._prepare_staged(self._staged) if self._is_staged(fb) else self._prepare_unstaged(fb)

    def _prepare_unstaged(self, fb: ForwardBatch) -> int:
        """A decode batch built elsewhere: copied into the static buffers on the device."""
        padded = padded_batch_size(fb.batch_size, self.batch_sizes)
        self.inputs.fill(fb, padded)
        self._fed_by = None
        v = self._sliced(padded)
        self.backend.init_forward_metadata_replay_cuda_graph(
            padded, v["req_pool_indices"], v["seq_lens"], padded_seq_lens_cpu(fb.seq_lens_cpu, padded),
        )
        return padded

    def _prepare_staged(self, staged: StagedDecode) -> int:
        padded = staged.padded_bs
        v = self._sliced(padded)
        extra = {"shared_prefix": True} if staged.shared_prefix else {}
        self.backend.init_forward_metadata_replay_cuda_graph(
            padded, v["req_pool_indices"], v["seq_lens"], None,
            indptr_host=staged.kv_indptr_host, seq_lens_host=staged.seq_lens_host, **extra,
        )
        return padded

    def _launch(self, staged: StagedDecode) -> None:
        """Replay the graph of a staged batch; then, while it runs, pack the step predicted to
        follow."""
        padded = self._prepare_staged(staged)
        # The copies enqueued so far were the staged words' last readers: sealed before the
        # replay, the next upload waits for them, not for this whole step.
        self._upload.seal()
        if staged.device_tokens is not None:
            self.inputs.input_ids[: staged.device_tokens.numel()].copy_(staged.device_tokens)
        (self.shared_graphs if staged.shared_prefix else self.graphs)[padded].replay()
        self._fed_by = (staged.shared_prefix, padded)
        staged.launched = True
        self.predict_next()

    def _is_staged(self, fb: ForwardBatch) -> bool:
        # Every upload of graph words stages a new batch, so the last one staged is the one whose
        # words (and host views) the buffers hold.
        staged = self._staged
        return staged is not None and staged.batch is fb

    def replay(self, fb: ForwardBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [bs, vocab] of a decode batch and their argmax [bs] on the device,
        both valid until the next replay."""
        if self._is_staged(fb):
            staged = self._staged
            if staged.launched:  # launched at staging (stage_next): this forward is that run
                staged.launched = False
            else:
                self._launch(staged)
            shared, padded = staged.shared_prefix, staged.padded_bs
            self.last_readback_slot = staged.readback_slot
        else:
            shared, padded = False, self._prepare_unstaged(fb)
            self.graphs[padded].replay()
            self._fed_by = (False, padded)
            self.last_readback_slot = None
        bs = fb.batch_size
        logits, ids = (self.shared_outputs if shared else self.outputs)[padded]
        return self._views.get(("output", shared, padded, bs), lambda: (logits[:bs], ids[:bs]))

    def replay_seconds(self, bs: int, iters: int = 20) -> float:
        """GPU time of one decode step of bs rows alone: the graph that serves bs, replayed back
        to back on whatever its static buffers hold (replaying the last staged step rewrites the
        same KV entries with the same values). A step's latency minus this is host time."""
        padded = padded_batch_size(bs, self.batch_sizes)
        graph = self.graphs[padded]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.inputs.readback_slot.zero_()  # no step in flight may find these ids in its ring row
        self._fed_by = (False, padded)
        graph.replay()
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters


def build_cuda_graph_runner(model_runner: "ModelRunner") -> Optional[CudaGraphRunner]:
    """A captured CudaGraphRunner, or None (logged) when decode should run eagerly."""
    reason = cuda_graph_disabled_reason(model_runner.server, model_runner.device, model_runner.attn_backend)
    if reason is not None:
        logger.info("CUDA graphs off: %s", reason)
        return None
    runner = CudaGraphRunner(model_runner)
    try:
        runner.capture()
    except Exception as e:  # add the way out to whatever broke the capture
        raise RuntimeError(f"CUDA graph capture failed: {e}; --server.disable_cuda_graph decodes eagerly") from e
    return runner

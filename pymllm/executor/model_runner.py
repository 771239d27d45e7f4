"""ModelRunner: owns the model, the KV pools and the attention backend; runs batches.

The scheduler hands over a ScheduledBatch (plain lists); here it becomes a ForwardBatch on the
device, goes through the model, and the sampled tokens come back as Python ints.
"""

from __future__ import annotations

import logging
import time
from typing import List, Optional, Tuple

import numpy as np
import torch

from pymllm.configs.errors import ConfigError
from pymllm.configs.global_config import GlobalConfig
from pymllm.configs.model_config import ModelConfig, load_model_config
from pymllm.engine.forward_batch import ForwardBatch, ForwardMode
from pymllm.executor.batch_inputs import HostBatch, InputStager, extend_as_decode_rows, host_batch, pack_eager
from pymllm.executor.cuda_graph_runner import build_cuda_graph_runner, extend_runs_as_decode, graph_max_batch_size
from pymllm.executor.device_memory import device_memory
from pymllm.executor.multimodal_batch import attach_multimodal_inputs
from pymllm.executor.pending_batch import PendingBatch, Readback, collect as collect_pending
from pymllm.executor.prefill_graphs import PrefillGraphs, build_prefill_graphs
from pymllm.executor.prompt_scoring import plan_prompt_scoring, score_prompt_rows
from pymllm.layers.attention.selection import attention_jit_builds, create_attention_backend
from pymllm.layers.kernels.pdl import configure as configure_pdl
from pymllm.layers.sampler import Sampler, SamplingBatchInfo, is_plain_greedy
from pymllm.mem_cache.memory_pool import KVPool, ReqToTokenPool, TokenToKVPoolAllocator
from pymllm.model_loader.loader import load_model
from pymllm.executor.grammar_mask import allowed_token_mask
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import BatchResult, ScheduledBatch
from pymllm.quantization import get_quantization_config
from pymllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_CPU_KV_BUDGET_BYTES = 1 << 30  # default KV budget on CPU when --server.max_total_tokens is unset
_CPU_MAX_DEFAULT_TOKENS = 65536


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--server.device: cuda requested but no CUDA device is available")
    return torch.device(name)


class ModelRunner:
    def __init__(self, config: GlobalConfig, model_config: ModelConfig, device: torch.device):
        self.config = config
        self.server = config.server
        self.model_config = model_config
        self.device = device
        self.dtype = model_config.dtype
        self.model = None
        self.cuda_graph_runner = None
        self.prefill_graphs: Optional[PrefillGraphs] = None
        # (logits, their argmax on the device, the Readback row the graph wrote them to or None)
        # of the last replay: the graph takes the argmax
        self._graph_argmax: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[int]]] = None

    # ---------------- set-up ----------------
    def initialize(self) -> None:
        torch.manual_seed(self.server.random_seed)
        configure_pdl(self.server.disable_pdl, self.device)
        quant_config = get_quantization_config(self.config.quantization.method, self.model_config.hf_config)
        self.model = load_model(
            self.model_config, self.server.load_format, self.device, seed=self.server.random_seed,
            quant_config=quant_config, extra_builds=attention_jit_builds(self.server.attention_backend, self),
        )
        self._init_memory_pools()
        self.attn_backend = create_attention_backend(self.server.attention_backend, self)
        self.sampler = Sampler()
        self.stager = InputStager(self.device)
        # A row per request, and per row of the largest decode graph (whose argmax writes them).
        self.readback = Readback(max(self.req_to_token_pool.size, graph_max_batch_size(self.server)), self.device)
        if self.device.type == "cuda":
            self.warmup()
        self.cuda_graph_runner = build_cuda_graph_runner(self)
        self.prefill_graphs = build_prefill_graphs(self)

    def warmup(self) -> None:
        """Run a prefill and an extend on top of it, so that JIT-compiled attention kernels are
        built during start-up instead of on the first request."""
        start = time.perf_counter()
        params = SamplingParams(max_new_tokens=1, temperature=0.0).with_defaults({})
        req = Req(rid="warmup", origin_input_ids=list(range(1, 13)), sampling_params=params, seed=0)
        req.req_pool_idx = self.req_to_token_pool.alloc()
        first = self.token_to_kv_pool_allocator.alloc(8)
        second = self.token_to_kv_pool_allocator.alloc(4)
        req.kv_slots = first
        self.run_batch(ScheduledBatch(ForwardMode.EXTEND, [req], [0], [8], first, [False]))
        self.run_batch(ScheduledBatch(ForwardMode.EXTEND, [req], [8], [4], second, [True]))
        torch.cuda.synchronize(self.device)
        self.token_to_kv_pool_allocator.free(np.concatenate([first, second]))
        self.req_to_token_pool.free(req.req_pool_idx)
        logger.info("Warm-up prefill done in %.1f s", time.perf_counter() - start)

    def _kv_capacity(self) -> int:
        mc = self.model_config
        per_token = KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        requested = self.server.max_total_tokens
        if self.device.type == "cpu":
            default = min(_CPU_MAX_DEFAULT_TOKENS, _CPU_KV_BUDGET_BYTES // per_token)
            return int(requested or default)
        free, total = device_memory(self.device)
        budget = free - total * (1.0 - self.server.mem_fraction_static)
        fit = int(budget // per_token)
        if requested:
            if requested > fit:
                logger.warning("--server.max_total_tokens %d exceeds what fits (%d)", requested, fit)
            return int(requested)
        if fit <= 0:
            raise ConfigError(
                "--server.mem_fraction_static: no GPU memory left for the KV cache after loading "
                f"the model (free {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB); raise it"
            )
        return fit

    def _init_memory_pools(self) -> None:
        mc = self.model_config
        self.max_total_tokens = self._kv_capacity()
        self.req_to_token_pool = ReqToTokenPool(
            self.server.max_running_requests + 2, mc.context_length, self.device
        )
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(self.max_total_tokens)
        self.kv_pool = KVPool(
            self.max_total_tokens, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype, self.device
        )
        gib = KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        logger.info(
            "KV cache: %d tokens (%.2f GiB), %d request slots",
            self.max_total_tokens, self.max_total_tokens * gib / 2**30, self.req_to_token_pool.size,
        )

    # ---------------- batches ----------------
    def build_forward_batch(self, batch: ScheduledBatch, device_tokens: Optional[torch.Tensor] = None,
                            eager: bool = False) -> ForwardBatch:
        """The batch on the device: its integers packed on the host and moved in one copy.

        A decode batch that will replay a CUDA graph is padded on the host and copied straight
        into the graph's static input buffers. Either way the device tensors live in reused
        buffers: a batch is valid until the next build_forward_batch.
        device_tokens: a decode batch's input tokens, already on the device (the ids of the step
        it follows, whose values the host does not know yet); they replace the host's.
        eager: never an extend replayed as decode rows (a batch that scores prompt rows needs
        the eager forward's hidden states).
        """
        graphs = self.cuda_graph_runner
        # A decode step is usually the one after the last: packed while that one ran.
        fb = graphs.stage_next(batch, device_tokens) if graphs is not None else None
        if fb is not None:
            attach_multimodal_inputs(self.model, batch, fb, self.device)
            return fb
        hb = host_batch(batch, self.req_to_token_pool.max_context_len)
        # Rows of a single request all read its KV: the shared-prefix graphs read it once.
        shared = (graphs is not None and batch.mode.is_extend() and hb.batch_size == 1
                  and graphs.has_shared_prefix_graph(len(hb.input_ids)))
        if graphs is not None and batch.mode.is_decode() and graphs.fits(hb.batch_size):
            # the graph records the new slots in req_to_token
            fb = graphs.stage(hb, decode=True, device_tokens=device_tokens)
        elif graphs is not None and not eager and batch.mode.is_extend() and extend_runs_as_decode(
            len(hb.input_ids), int(hb.seq_lens.max()), any(getattr(r, "mm_inputs", None) for r in batch.reqs),
            graphs.max_bs, shared,
        ):
            fb = self._stage_extend_as_decode(hb, shared)
        else:
            fb, write_index, write_loc = self._stage_eager(batch.mode, hb)
            # Record where every new KV entry lives: one scatter into the flattened table.
            self.req_to_token_pool.req_to_token.view(-1).index_copy_(0, write_index, write_loc)
            if device_tokens is not None:
                fb.input_ids.copy_(device_tokens)
        # Images and mrope deltas; decode deltas attached here reach a staged graph batch's
        # static buffer in prepare_replay.
        attach_multimodal_inputs(self.model, batch, fb, self.device)
        return fb

    def _stage_extend_as_decode(self, hb: HostBatch, shared_prefix: bool) -> ForwardBatch:
        """Stage an extend as decode-graph rows (one per new token); ``shared_prefix``: into a
        shared-prefix graph (the rows all belong to one request)."""
        ext = extend_as_decode_rows(hb)
        n = len(ext.prefix_write_index)
        if n:
            # A prefix-cache hit's first extend copies the cached slots into the request's row,
            # more writes than the graph's per-row buffers hold: scattered here, before the
            # graph's attention reads the row. Index and slots travel in one pinned copy.
            _, words = self.stager.upload(np.concatenate([ext.prefix_write_index, ext.prefix_write_loc]), 2 * n)
            table = self.req_to_token_pool.req_to_token
            table.view(-1).index_copy_(0, words[:n], words[n : 2 * n].to(table.dtype))
        fb = self.cuda_graph_runner.stage(ext.rows, shared_prefix=shared_prefix)
        fb.sample_rows = ext.sample_rows
        return fb

    def _stage_eager(self, mode: ForwardMode, hb: HostBatch) -> Tuple[ForwardBatch, torch.Tensor, torch.Tensor]:
        layout, words = pack_eager(hb)
        _, device_words = self.stager.upload(words, layout.device_words)
        v = layout.torch_views(device_words)
        fb = ForwardBatch(
            forward_mode=mode,
            batch_size=hb.batch_size,
            input_ids=v["input_ids"],
            positions=v["positions"],
            req_pool_indices=v["req_pool_indices"],
            seq_lens=v["seq_lens"],
            out_cache_loc=v["out_cache_loc"],
            seq_lens_cpu=hb.seq_lens.tolist(),
            req_to_token_pool=self.req_to_token_pool,
            kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
            mrope_position_deltas=v.get("mrope_position_deltas"),
        )
        if mode.is_extend():
            fb.extend_seq_lens_cpu = hb.extend_seq_lens.tolist()
            fb.extend_prefix_lens_cpu = hb.extend_prefix_lens.tolist()
            fb.extend_seq_lens = v["extend_seq_lens"]
            fb.extend_prefix_lens = v["extend_prefix_lens"]
        return fb, v["kv_write_index"], v["kv_write_loc"]

    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Logits of each sequence's last new token, float32 [bs, vocab].

        A graph replay needs no inference mode (entering it costs microseconds per step); the
        eager forward runs in it."""
        self._graph_argmax = None
        if (
            self.cuda_graph_runner is not None
            and fb.forward_mode.is_decode()
            and self.cuda_graph_runner.can_run(fb)
        ):
            logits, ids = self.cuda_graph_runner.replay(fb)
            slot = self.cuda_graph_runner.last_readback_slot
            if fb.sample_rows is not None:  # an extend run as decode rows: each request's last row
                slot = None
                rows = fb.sample_rows
                last = rows[-1]
                if rows == list(range(last - len(rows) + 1, last + 1)):
                    picked = slice(last - len(rows) + 1, last + 1)
                else:
                    picked = torch.tensor(rows, device=logits.device)
                logits, ids = logits[picked], ids[picked]
            self._graph_argmax = (logits, ids, slot)
            return logits
        return self._forward_eager(fb)

    @torch.inference_mode()
    def _forward_eager(self, fb: ForwardBatch) -> torch.Tensor:
        """The forward of a batch no decode graph runs: a prefill or extend replays the piecewise
        prefill graphs where its token count has one (attention still runs here, eagerly)."""
        self.attn_backend.init_forward_metadata(fb)
        graphs = self.prefill_graphs
        bucket = graphs.bucket_of(fb) if graphs is not None else None
        if bucket is not None:
            return self.model.logits(graphs.run(fb, bucket), fb).float()
        return self.model(fb.input_ids, fb.positions, fb).float()

    def _from_graph(self, logits: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[int]]:
        """(the argmax the replayed graph that returned ``logits`` took of them, the Readback row
        it wrote them to or None), or (None, None) for logits no graph returned."""
        graph = self._graph_argmax
        if graph is not None and graph[0] is logits:
            return graph[1], graph[2]
        return None, None

    def launch_batch(self, batch: ScheduledBatch, follows: Optional[PendingBatch] = None) -> PendingBatch:
        """Enqueue a batch's forward and sampling and start copying its tokens to the host;
        returns without waiting for them (``collect`` does).

        follows: the launched decode step this one continues (the same requests, one position
        further); its sampled ids become this step's input tokens on the device, so this step
        can be launched before the host has read them."""
        device_tokens = None
        if follows is not None:
            prev = follows.batch
            if not (batch.mode.is_decode() and prev.mode.is_decode() and len(batch.reqs) == len(prev.reqs)
                    and all(a is b for a, b in zip(batch.reqs, prev.reqs))):
                raise ValueError("launch_batch: a following batch must decode the same requests "
                                 "as the one it follows")
            device_tokens = follows.device_ids
        scoring = plan_prompt_scoring(batch)
        fb = self.build_forward_batch(batch, device_tokens, eager=scoring is not None)
        if scoring is not None:
            fb.prompt_logprob_rows = torch.tensor(scoring.rows, dtype=torch.int64, device=self.device)
        logits = self.forward(fb)
        # A follower's requests have one token in flight that the host has not appended yet:
        # it counts for the step being sampled and for the penalties.
        pending = self._launch_sampling(logits, batch, in_flight=device_tokens)
        if scoring is not None:
            if fb.prompt_hidden is None:
                raise RuntimeError(f"{type(self.model).__name__} does not set aside the rows that score prompts")
            # Waits for the forward: extend batches are never overlapped with the next step.
            pending.prompt_logprobs = score_prompt_rows(self.model.lm_head, fb.prompt_hidden, scoring)
        return pending

    def collect(self, pending: PendingBatch) -> BatchResult:
        """Wait for a launched batch's tokens (only its own copies, not later launches)."""
        return collect_pending(pending)

    def sample(self, logits: torch.Tensor, batch: ScheduledBatch) -> BatchResult:
        """The tokens of logits the forward of ``batch`` just returned, waited for."""
        return self.collect(self._launch_sampling(logits, batch))

    def _launch_sampling(self, logits: torch.Tensor, batch: ScheduledBatch,
                         in_flight: Optional[torch.Tensor] = None) -> PendingBatch:
        reqs = batch.reqs
        params = [r.sampling_params for r in reqs]
        if is_plain_greedy(params):
            # The Sampler would take the same argmax; skipping it skips building and copying
            # the per-request tensors (and inference mode: an argmax records no autograd state).
            ids, slot = self._from_graph(logits)
            if ids is None:
                ids = torch.argmax(logits, dim=-1)
            if slot is not None:  # the graph's argmax wrote them to the host itself
                host, done = self.readback.mirrored(slot, ids.numel())
            else:
                host, _, done = self.readback.start(ids)
            return PendingBatch(batch, ids, host, done)
        # ``in_flight`` is read after this step's graph has run, so it must not be a graph's
        # argmax buffer: it is not, since the step it came from sampled the same requests with
        # the same parameters, hence through the Sampler too, whose ids are a tensor of their own.
        _, slot = self._from_graph(logits)
        ids, parts = self._sample_with_sampler(logits, reqs, params, in_flight)
        # Into the row the graph reserved (its argmax's ids there are overwritten, in stream order).
        host, copies, done = self.readback.start(ids, parts, slot=slot)
        return PendingBatch(batch, ids, host, done, copies or None)

    @torch.inference_mode()
    def _sample_with_sampler(
        self, logits: torch.Tensor, reqs: List[Req], params: List[SamplingParams],
        in_flight: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
        """(sampled ids on the device, the logprob tensors or []). ``in_flight``: each request's
        token of the step still in flight (not in output_ids)."""
        need_history = any(p.uses_penalties for p in params)
        ahead = 0 if in_flight is None else 1
        info = SamplingBatchInfo.from_params(
            params,
            seeds=[r.seed for r in reqs],
            steps=[len(r.output_ids) + ahead for r in reqs],
            vocab_size=logits.shape[-1],
            device=logits.device,
            prompt_ids=[r.origin_input_ids for r in reqs] if need_history else None,
            output_ids=[r.output_ids for r in reqs] if need_history else None,
            in_flight_ids=in_flight,
        )
        info.allowed_tokens = allowed_token_mask([r.grammar for r in reqs], logits.shape[-1], logits.device)
        out = self.sampler(logits, info)
        if out.logprobs is None:
            return out.next_token_ids, []
        return out.next_token_ids, [out.logprobs, out.top_logprob_ids, out.top_logprob_vals]

    def run_batch(self, batch: ScheduledBatch) -> BatchResult:
        return self.collect(self.launch_batch(batch))

    def clear(self) -> None:
        self.req_to_token_pool.clear()
        self.token_to_kv_pool_allocator.clear()


def load_model_runner(config: GlobalConfig) -> ModelRunner:
    """The runner of ``config.server``: device resolved, model loaded, pools sized, graphs
    captured (the scheduler process, the in-process tests and the profiling scripts)."""
    device = resolve_device(config.server.device)
    runner = ModelRunner(config, load_model_config(config.server, device), device)
    runner.initialize()
    return runner

"""The batching policy: FCFS admission, chunked prefill, decode, retraction, finishing.

The scheduler decides *what* runs and owns the KV bookkeeping (slot allocation, release,
prefix matching); the ModelRunner decides *how* it runs. Nothing in this module builds tensors.

With ``overlap``, a decode step that can only be followed by the same requests' next step (no
waiting request could be admitted, no request is sure to finish) has that next step launched
before its own tokens are read: the GPU runs step n+1 while the host reads step n's tokens,
checks stops and streams them out. A request that turns out to have finished at step n (EOS, a
stop string) wasted its row of step n+1, whose token is dropped and whose KV slot is freed when
that step is collected.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Deque, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

from pymllm.engine.forward_batch import ForwardMode
from pymllm.engine.io_struct import CONTEXT_LENGTH_EXCEEDED, FinishReason, RequestRefused, TokenizedGenerateReq
from pymllm.mem_cache.base_prefix_cache import ChunkCache, PrefixCache
from pymllm.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from pymllm.mem_cache.prompt_score_cache import PromptScoreCache
from pymllm.orchestrator.grammar import Grammars, PendingGrammars, check_grammar
from pymllm.orchestrator.prompt_scores import reuse_scores, scored_in_batch
from pymllm.orchestrator.request import Req, ReqState
from pymllm.orchestrator.schedule_batch import BatchResult, ScheduledBatch
from pymllm.orchestrator.stop_checker import StopChecker

logger = logging.getLogger(__name__)


class BatchRunner(Protocol):
    req_to_token_pool: ReqToTokenPool
    token_to_kv_pool_allocator: TokenToKVPoolAllocator

    def run_batch(self, batch: ScheduledBatch) -> BatchResult: ...


@runtime_checkable
class OverlapRunner(BatchRunner, Protocol):
    """A runner that can launch a batch without waiting for its tokens (``overlap``)."""

    def launch_batch(self, batch: ScheduledBatch, follows: Optional[object] = None) -> object: ...

    def collect(self, pending: object) -> BatchResult: ...


class RequestRejected(RequestRefused):
    """The request can never run (e.g. prompt longer than the context)."""


class Scheduler:
    def __init__(
        self,
        runner: BatchRunner,
        *,
        max_running_requests: int,
        max_prefill_tokens: int,
        context_length: int,
        stop_checker: StopChecker,
        prefix_cache: Optional[PrefixCache] = None,
        random_seed: int = 0,
        check_invariants: bool = False,
        overlap: bool = False,
        grammars: Optional[Grammars] = None,
        prompt_scores: Optional[PromptScoreCache] = None,
        mixed: bool = False,
    ):
        self.runner = runner
        self.req_pool = runner.req_to_token_pool
        self.allocator = runner.token_to_kv_pool_allocator
        self.max_running_requests = max_running_requests
        self.max_prefill_tokens = max_prefill_tokens
        self.context_length = context_length
        self.stop_checker = stop_checker
        self.prefix_cache = prefix_cache or ChunkCache(self.allocator)
        self.check_invariants = check_invariants
        if overlap and not isinstance(runner, OverlapRunner):
            raise TypeError(f"overlap needs a runner with launch_batch and collect; {type(runner).__name__} has not")
        self.overlap = overlap
        # A prefill batch also carries every running request's next decode token (ForwardMode.MIXED),
        # so that admitting a prompt does not stall the requests being decoded for a step.
        self.mixed = mixed
        self.grammars = grammars
        self.compiling = PendingGrammars()  # admitted once their grammar is compiled
        # Scores of prompt positions, so that scoring requests can reuse cached prefixes (None: off).
        self.prompt_scores = prompt_scores
        # (batch, the runner's handle) of a decode step launched and not collected yet
        self._in_flight: Optional[Tuple[ScheduledBatch, object]] = None
        self._rng = random.Random(random_seed)
        self.waiting: Deque[Req] = deque()
        self.running: List[Req] = []  # decoding
        self.chunked_req: Optional[Req] = None  # prompt partially prefilled
        self._last_was_prefill = False
        self.num_retractions = 0
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0
        self.num_reused_prompt_scores = 0

    # ---------------- requests in and out ----------------
    def add_request(self, msg: TokenizedGenerateReq) -> Req:
        """Queue a request; raises RequestRejected if it can never run."""
        params = msg.sampling_params
        prompt_len = len(msg.input_ids)
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty")
        if prompt_len >= self.context_length:
            raise RequestRejected(
                f"the prompt has {prompt_len} tokens; this model's context length is "
                f"{self.context_length} (the prompt must leave room for at least one new token)",
                CONTEXT_LENGTH_EXCEEDED,
            )
        if prompt_len + 1 > self.allocator.size:
            raise RequestRejected(
                f"the prompt has {prompt_len} tokens but the KV cache holds only {self.allocator.size}"
            )
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        req = Req(rid=msg.rid, origin_input_ids=list(msg.input_ids), sampling_params=params, seed=seed,
                  stream=msg.stream, mm_inputs=msg.mm_inputs)
        if params.constrained:
            if self.grammars is None:
                raise RequestRejected("constrained decoding: this scheduler has no grammar support")
            try:
                check_grammar(**params.grammar_spec)  # the spec's own errors at once
            except ValueError as exc:
                raise RequestRejected(str(exc)) from None
        if params.max_new_tokens == 0 and not params.prompt_logprobs:
            req.finish_reason = FinishReason("length")
            req.state = ReqState.FINISHED
            return req
        if params.constrained and params.max_new_tokens != 0:  # compiled meanwhile; no token, no grammar
            self.compiling.add(req, self.grammars.submit(**params.grammar_spec))
            return req
        self.waiting.append(req)
        return req

    def _admit_compiled(self) -> List[Req]:
        """Queue the requests whose grammar is now compiled; returns those refused because it
        could not be (a 400, as a spec refused on arrival)."""
        refused = []
        for req, future in self.compiling.take_done():
            try:
                req.grammar = self.grammars.matcher_of(future.result())
            except ValueError as exc:
                self._release(req, RequestRejected(str(exc)).finish_reason())
                refused.append(req)
                continue
            except Exception:  # the compiler itself failed (e.g. the vocabulary could not be read)
                logger.exception("request %s: building its grammar failed", req.rid)
                self._release(req, FinishReason("abort", message="internal error: the grammar could not be built",
                                                status_code=500))
                refused.append(req)
                continue
            self.waiting.append(req)
        return refused

    def abort(self, rid: str) -> Optional[Req]:
        """Finish a request wherever it is; its KV slots are released at once."""
        req = self.compiling.remove(rid)
        if req is not None:
            self._release(req, FinishReason("abort", message="aborted"))
            return req
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                self._release(req, FinishReason("abort", message="aborted"))
                return req
        candidates = self.running + ([self.chunked_req] if self.chunked_req else [])
        for req in candidates:
            if req.rid == rid:
                if req is self.chunked_req:
                    self.chunked_req = None
                else:
                    self.running.remove(req)
                self._release(req, FinishReason("abort", message="aborted"))
                return req
        return None

    def flush_caches(self) -> None:
        """Forget every cached prefix and prompt score (``/flush_cache``; call it only when idle)."""
        self.prefix_cache.reset()
        if self.prompt_scores is not None:
            self.prompt_scores.reset()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self._in_flight or self.compiling)

    # ---------------- one step ----------------
    def step(self) -> List[Req]:
        """Run one batch; returns the requests that produced output or finished.

        With ``overlap`` a decode batch is collected one call later than it is launched when
        its follower could be launched first; every call still collects exactly one batch (none
        when nothing can run: then it waits a moment for a grammar being compiled, if any)."""
        refused = self._admit_compiled()
        if self._in_flight is None:
            batch = self._next_batch()
            if batch is None:
                self.compiling.wait()
                return refused
            if not (self.overlap and batch.mode.is_decode()):
                return refused + self._finish_step(batch, self.runner.run_batch(batch))
            self._in_flight = (batch, self.runner.launch_batch(batch))
        batch, pending = self._in_flight
        follower = self._follow_decode(batch)
        self._in_flight = (follower, self.runner.launch_batch(follower, follows=pending)) if follower else None
        return refused + self._finish_step(batch, self.runner.collect(pending))

    def _finish_step(self, batch: ScheduledBatch, result: BatchResult) -> List[Req]:
        touched = self._process_result(batch, result)
        if self.check_invariants:
            self.verify_kv_accounting()
        return touched

    def _follow_decode(self, batch: ScheduledBatch) -> Optional[ScheduledBatch]:
        """The next decode step of the same requests, to launch before ``batch``'s tokens are
        read, or None when the next batch should be decided after them: a waiting request could
        be admitted (a free running place and request slot) or a prompt is half prefilled, the
        running set changed (an abort), a request is sure to finish at this step (then its next
        position may not exist), or slots are short (the next step may retract). Requests that wait for a running
        place do not stop it: a place opens only when a request finishes, which is either
        foreseen here (length) or seen one step later (a stop), at the cost of that one step."""
        reqs = batch.reqs
        if self.chunked_req or self._could_admit() or len(reqs) != len(self.running):
            return None
        if any(a is not b for a, b in zip(reqs, self.running)):
            return None
        if any(req.grammar is not None for req in reqs):  # the next mask needs this step's token
            return None
        for req in reqs:
            params = req.sampling_params
            produced = len(req.output_ids) + 1  # after this step
            if params.max_new_tokens is not None and produced >= params.max_new_tokens:
                return None
            # The stop checker's context limit, which also keeps the next position in the table.
            if req.prompt_len + produced >= self.context_length or req.kv_len + 2 > self.allocator.size:
                return None
        if self._available_slots() < len(reqs):
            return None
        return self._decode_step(list(reqs), [p + 1 for p in batch.prefix_lens])

    def _could_admit(self) -> bool:
        return (bool(self.waiting) and len(self.running) < self.max_running_requests
                and self.req_pool.available_size() > 0)

    def _next_batch(self) -> Optional[ScheduledBatch]:
        # Alternate with decode after a prefill so running requests keep streaming while
        # long prompts are chunked in.
        prefer_decode = self._last_was_prefill and self.running
        if not prefer_decode:
            batch = self._schedule_prefill()
            if batch is not None:
                self._last_was_prefill = True
                return batch
        self._last_was_prefill = False
        batch = self._schedule_decode()
        if batch is None and prefer_decode:
            batch = self._schedule_prefill()
            self._last_was_prefill = batch is not None
        return batch

    def _available_slots(self) -> int:
        return self.allocator.available_size() + self.prefix_cache.evictable_size()

    def _alloc_slots(self, n: int) -> Optional[np.ndarray]:
        if self.allocator.available_size() < n:
            self.prefix_cache.evict(n - self.allocator.available_size())
        return self.allocator.alloc(n)

    def _schedule_prefill(self) -> Optional[ScheduledBatch]:
        budget = self.max_prefill_tokens
        reqs: List[Req] = []
        prefix_lens: List[int] = []
        extend_lens: List[int] = []
        samples: List[bool] = []
        locs: List[np.ndarray] = []
        # Each decoding request needs one slot next step; keep that headroom.
        reserve = len(self.running)

        def take(req: Req, prefix: int) -> bool:
            nonlocal budget
            remaining = len(req.fill_ids) - prefix
            n = min(remaining, budget)
            if n <= 0 or self._available_slots() - n < reserve:
                return False
            slots = self._alloc_slots(n)
            if slots is None:
                return False
            reqs.append(req)
            prefix_lens.append(prefix)
            extend_lens.append(n)
            samples.append(n == remaining)
            locs.append(slots)
            budget -= n
            return True

        if self.chunked_req is not None:
            req = self.chunked_req
            if not take(req, req.kv_len):
                return None
            if samples[-1]:
                self.chunked_req = None
        while (
            self.waiting
            and self.chunked_req is None
            and budget > 0
            and len(self.running) + len(reqs) < self.max_running_requests
        ):
            req = self.waiting[0]
            if self.req_pool.available_size() == 0:
                break
            if req.prompt_logprobs_pending and self.prompt_scores is not None:
                self.num_reused_prompt_scores += reuse_scores(self.prompt_scores, req)
                if scored_in_batch(req, reqs):
                    break
            match = self.prefix_cache.match_prefix(req.cache_key())
            # Always compute at least the last token: its logits give the next token.
            matched = min(len(match.slots), len(req.fill_ids) - 1)
            if req.prompt_logprobs_pending:  # positions still to be scored must be computed
                matched = min(matched, len(req.prompt_logprobs))
            self.prefix_cache.lock(match.handle)
            req.kv_slots = match.slots[:matched]
            req.cache_owned_len = matched
            req.prefix_handle = match.handle
            if not take(req, matched):
                self.prefix_cache.unlock(match.handle)
                req.kv_slots = np.empty(0, dtype=np.int64)
                req.prefix_handle = None
                break
            self.waiting.popleft()
            req.req_pool_idx = self.req_pool.alloc()
            req.state = ReqState.PREFILLING
            if req.retractions == 0:
                req.cached_tokens = matched
                self.num_prompt_tokens += req.prompt_len
                self.num_cached_prompt_tokens += matched
            if not samples[-1]:
                self.chunked_req = req
        if not reqs:
            return None
        mode = ForwardMode.EXTEND
        riders = self._decode_riders()
        if riders:
            # take() kept one slot per running request free for exactly this.
            slots = self._alloc_slots(len(riders))
            if slots is not None:
                mode = ForwardMode.MIXED
                reqs += riders
                prefix_lens += [r.kv_len for r in riders]
                extend_lens += [1] * len(riders)
                samples += [True] * len(riders)
                locs.append(slots)
        return ScheduledBatch(
            mode=mode, reqs=reqs, prefix_lens=prefix_lens, extend_lens=extend_lens,
            out_cache_loc=np.concatenate(locs), sample=samples,
        )

    def _decode_riders(self) -> List[Req]:
        """The running requests to decode inside a prefill batch (``mixed``): all of them, unless
        one needs what only a decode step gives it: its mrope position delta (a request with
        images) or the decode step's handling of a full pool."""
        if not self.mixed or not self.running:
            return []
        for req in self.running:
            if getattr(req, "mm_inputs", None) is not None or self._fills_pool(req):
                return []
        return list(self.running)

    def _fills_pool(self, req: Req) -> bool:
        """The sequence alone fills the whole KV pool, so it cannot grow by a token."""
        return req.kv_len + 1 > self.allocator.size

    def _schedule_decode(self) -> Optional[ScheduledBatch]:
        if not self.running:
            return None
        for req in list(self.running):
            if self._fills_pool(req):  # it cannot grow: finish it
                self.running.remove(req)
                self._release(req, FinishReason("length"))
        while self.running and self._available_slots() < len(self.running):
            self._retract_one()
        if not self.running:
            return None
        reqs = list(self.running)
        return self._decode_step(reqs, [r.kv_len for r in reqs])

    def _decode_step(self, reqs: List[Req], prefix_lens: List[int]) -> ScheduledBatch:
        """One decode row per request at ``prefix_lens``, each with a new KV slot (the caller
        has checked that enough are available)."""
        slots = self._alloc_slots(len(reqs))
        assert slots is not None
        return ScheduledBatch(
            mode=ForwardMode.DECODE, reqs=reqs, prefix_lens=prefix_lens,
            extend_lens=[1] * len(reqs), out_cache_loc=slots, sample=[True] * len(reqs),
        )

    def _retract_one(self) -> None:
        # The most recently admitted request loses the least work when recomputed.
        req = self.running.pop()
        logger.info("KV cache full: retracting request %s (%d tokens) to the waiting queue", req.rid, req.kv_len)
        self._free_kv(req)
        req.state = ReqState.WAITING
        req.retractions += 1
        self.num_retractions += 1
        self.waiting.appendleft(req)

    # ---------------- results ----------------
    def _process_result(self, batch: ScheduledBatch, result: BatchResult) -> List[Req]:
        touched: List[Req] = []
        offset = 0
        for i, req in enumerate(batch.reqs):
            n = batch.extend_lens[i]
            new_slots = batch.out_cache_loc[offset : offset + n]
            offset += n
            if req.finished:  # aborted while its batch was in flight
                self.allocator.free(new_slots)
                continue
            req.append_kv_slots(new_slots)
            if result.prompt_logprobs is not None and result.prompt_logprobs[i]:
                if self.prompt_scores is not None and req.prompt_score_keys is not None:
                    self.prompt_scores.insert(req.prompt_score_keys, len(req.prompt_logprobs), result.prompt_logprobs[i],
                                              req.sampling_params.top_logprobs)
                req.prompt_logprobs.extend(result.prompt_logprobs[i])
            if not batch.sample[i]:
                continue
            if req.sampling_params.max_new_tokens == 0:  # the prompt scored, nothing to generate
                touched.append(req)
                self._release(req, FinishReason("length"))
                continue
            token = result.next_token_ids[i]
            req.output_ids.append(token)
            if result.logprobs[i] is not None:
                req.logprobs.append(result.logprobs[i])
            touched.append(req)
            if req.state == ReqState.PREFILLING:
                req.state = ReqState.DECODING
                self.running.append(req)
            reason = self._advance_grammar(req, token)
            if reason is None or reason.type != "abort":
                reason = self.stop_checker.check(req, self.context_length) or reason
            if reason is not None:
                self.running.remove(req)
                self._release(req, reason)
        return touched

    @staticmethod
    def _advance_grammar(req: Req, token: int) -> Optional[FinishReason]:
        """Feed a grammar-constrained request's new token to its matcher: "stop" once the grammar
        is complete (after a stop token, even with ignore_eos), an error if it refuses the token
        (the mask allowed only tokens it accepts, so that is a bug)."""
        if req.grammar is None:
            return None
        if not req.grammar.accept_token(token):
            logger.error("request %s: its grammar refused token %d that the mask allowed", req.rid, token)
            return FinishReason("abort", message="internal error: the output left its grammar", status_code=500)
        if req.grammar.is_terminated():
            return FinishReason("stop", matched=token)
        return None

    def _free_kv(self, req: Req) -> None:
        if req.kv_slots.size:
            self.prefix_cache.cache_finished_req(req.cache_key(req.kv_len), req.kv_slots, req.prefix_handle)
        elif req.prefix_handle is not None:
            self.prefix_cache.unlock(req.prefix_handle)
        req.kv_slots = np.empty(0, dtype=np.int64)
        req.cache_owned_len = 0
        req.prefix_handle = None
        if req.req_pool_idx is not None:
            self.req_pool.free(req.req_pool_idx)
            req.req_pool_idx = None

    def _release(self, req: Req, reason: FinishReason) -> None:
        self._free_kv(req)
        req.finish_reason = reason
        req.state = ReqState.FINISHED

    # ---------------- introspection ----------------
    def verify_kv_accounting(self) -> None:
        """Allocator invariants, plus: every used slot belongs to the cache or to one request."""
        self.allocator.check_invariants()
        owned_by_reqs = sum(r.kv_len - r.cache_owned_len for r in self._active())
        in_flight = len(self._in_flight[0].out_cache_loc) if self._in_flight else 0
        expected = owned_by_reqs + in_flight + self.prefix_cache.total_cached()
        used = self.allocator.used_size()
        if used != expected:
            raise AssertionError(
                f"KV accounting: {used} slots in use, but requests own {owned_by_reqs}, a step in "
                f"flight {in_flight} and the prefix cache {self.prefix_cache.total_cached()}"
            )

    def _active(self) -> Sequence[Req]:
        return self.running + ([self.chunked_req] if self.chunked_req else [])

    def stats(self) -> dict:
        return {
            "running": len(self.running) + (1 if self.chunked_req else 0),
            "queued": len(self.waiting) + len(self.compiling),
            "kv_used": self.allocator.used_size(),
            "kv_total": self.allocator.size,
            "kv_cached": self.prefix_cache.total_cached(),
            "kv_evictable": self.prefix_cache.evictable_size(),
            "req_slots_free": self.req_pool.available_size(),
            "num_retractions": self.num_retractions,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_cached_prompt_tokens": self.num_cached_prompt_tokens,
            "num_reused_prompt_scores": self.num_reused_prompt_scores,
            **{f"cache_{k}": v for k, v in self.prefix_cache.stats().items()},
        }

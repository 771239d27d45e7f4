"""The scheduler process: owns the ModelRunner and runs the Scheduler's step loop."""

from __future__ import annotations

import logging
import os
import time
from typing import List, Optional

import zmq

from pymllm.configs.global_config import GlobalConfig
from pymllm.engine.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    ControlReq,
    ControlResp,
    PromptLogprob,
    TokenizedGenerateReq,
)
from pymllm.executor.model_runner import load_model_runner
from pymllm.orchestrator.gc_control import start_serving
from pymllm.orchestrator.grammar import Grammars
from pymllm.orchestrator.ipc import Endpoints, WorkerReady, pull, push
from pymllm.mem_cache.factory import create_prefix_cache
from pymllm.mem_cache.prompt_score_cache import PromptScoreCache
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.scheduler import RequestRejected, Scheduler
from pymllm.orchestrator.stop_checker import StopChecker
from pymllm.orchestrator.worker_common import run_worker

logger = logging.getLogger("scheduler")


def build_scheduler(config: GlobalConfig, check_invariants: bool = False) -> Scheduler:
    """Load the model and build a Scheduler around it (also used in-process by tests)."""
    from transformers import AutoTokenizer

    server = config.server
    runner = load_model_runner(config)
    model_config = runner.model_config
    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer_path)
    eos = set(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return Scheduler(
        runner,
        max_running_requests=server.max_running_requests,
        max_prefill_tokens=server.max_prefill_tokens,
        context_length=model_config.context_length,
        stop_checker=StopChecker(eos, tokenizer),
        prefix_cache=create_prefix_cache(config, runner.token_to_kv_pool_allocator),
        random_seed=server.random_seed,
        check_invariants=check_invariants,
        overlap=not server.disable_overlap_schedule,
        mixed=server.enable_mixed_batches,
        grammars=Grammars(tokenizer, model_config.vocab_size, eos),
        # Reused scores let scoring requests skip cached prefixes, so they go with the radix cache.
        prompt_scores=None if server.disable_radix_cache else PromptScoreCache(),
    )


def make_token_output(reqs: List[Req]) -> BatchTokenIDOut:
    """New tokens of each request since its last report."""
    out = BatchTokenIDOut([], [], [], [], [], [], [], [], [])
    for req in reqs:
        first_report = req.num_sent_tokens == 0
        out.prompt_tails.append(req.origin_input_ids[-4:] if first_report else None)
        new_ids = req.output_ids[req.num_sent_tokens :]
        req.num_sent_tokens = len(req.output_ids)
        logprobs = None
        if req.sampling_params.logprobs:
            logprobs = req.logprobs[req.num_sent_logprobs :]
            req.num_sent_logprobs = len(req.logprobs)
        out.rids.append(req.rid)
        out.new_token_ids.append(new_ids)
        out.finished_reasons.append(req.finish_reason)
        out.prompt_tokens.append(req.prompt_len)
        out.completion_tokens.append(len(req.output_ids))
        out.cached_tokens.append(req.cached_tokens)
        out.logprobs.append(logprobs)
        out.prompt_logprobs.append(_scored_prompt(req) if first_report else None)
        out.skip_special_tokens.append(req.sampling_params.skip_special_tokens)
        out.stop_strings.append(req.sampling_params.stop)
    return out


def _scored_prompt(req: Req) -> Optional[List[PromptLogprob]]:
    """The scored prompt of a request that asked, for its first report: the prompt's last chunk
    samples the first token (or, with max_new_tokens 0, ends the request), so scoring has ended by
    then unless the request was aborted or refused."""
    if not req.sampling_params.prompt_logprobs or req.prompt_logprobs_pending:
        return None
    if req.finish_reason is not None and req.finish_reason.type == "abort":
        return None
    return [(req.origin_input_ids[0], None, []), *req.prompt_logprobs]


class SchedulerLoop:
    def __init__(self, config: GlobalConfig, endpoints: Endpoints):
        self.config = config
        context = zmq.Context.instance()
        self.inbox = pull(context, endpoints.scheduler_in)
        self.to_detokenizer = push(context, endpoints.detokenizer_in)
        self.to_frontend = push(context, endpoints.frontend_in)
        self.scheduler = build_scheduler(config)
        self.started = time.monotonic()

    def ready_info(self) -> dict:
        runner = self.scheduler.runner
        return {
            "max_total_tokens": runner.max_total_tokens,
            "context_length": self.scheduler.context_length,
            "device": str(runner.device),
            "dtype": str(runner.dtype).replace("torch.", ""),
            "attention_backend": runner.attn_backend.name,
            "model_path": runner.model_config.model_path,
            "pid": os.getpid(),
        }

    def handle(self, msg) -> List[Req]:
        """Apply one incoming message; returns requests finished by it."""
        if isinstance(msg, TokenizedGenerateReq):
            try:
                req = self.scheduler.add_request(msg)
            except RequestRejected as e:
                req = Req(rid=msg.rid, origin_input_ids=msg.input_ids, sampling_params=msg.sampling_params, seed=0)
                req.finish_reason = e.finish_reason()
            return [req] if req.finished else []
        if isinstance(msg, AbortReq):
            req = self.scheduler.abort(msg.rid)
            return [req] if req is not None else []
        if isinstance(msg, ControlReq):
            self.to_frontend.send(self.control(msg))
            return []
        logger.error("unexpected message %r", type(msg).__name__)
        return []

    def control(self, msg: ControlReq) -> ControlResp:
        if msg.kind == "server_info":
            payload = {**self.ready_info(), **self.scheduler.stats(),
                       "uptime_s": round(time.monotonic() - self.started, 1)}
            return ControlResp(msg.request_id, True, payload)
        if msg.kind == "flush_cache":
            if self.scheduler.has_work():
                return ControlResp(msg.request_id, False, {"message": "cannot flush the cache while requests are running"})
            self.scheduler.flush_caches()
            return ControlResp(msg.request_id, True, {"message": "cache flushed"})
        return ControlResp(msg.request_id, False, {"message": f"unknown control request {msg.kind!r}"})

    def run(self) -> None:
        start_serving("scheduler", self.config.server.gc_warn_ms)
        self.to_frontend.send(WorkerReady("scheduler", self.ready_info()))
        while True:
            # Block when idle; drain without blocking while there is work.
            block = not self.scheduler.has_work()
            report: List[Req] = []
            while True:
                msg = self.inbox.recv(block=block)
                if msg is None:
                    break
                report.extend(self.handle(msg))
                block = False
            report.extend(self.scheduler.step())
            if report:
                self.to_detokenizer.send(make_token_output(report))


def scheduler_process_main(config: GlobalConfig, endpoints: Endpoints, parent_conn) -> None:
    run_worker(
        "scheduler", config.server.log_level, endpoints.frontend_in, parent_conn,
        lambda: SchedulerLoop(config, endpoints).run(),
    )

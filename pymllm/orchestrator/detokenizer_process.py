"""The detokenizer process: token ids -> text deltas, UTF-8 safe, stop strings trimmed."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import zmq

from pymllm.configs.global_config import GlobalConfig
from pymllm.configs.model_config import ModelConfig
from pymllm.engine.io_struct import BatchRequestOutput, BatchTokenIDOut, FinishReason, RequestOutput
from pymllm.orchestrator.gc_control import start_serving
from pymllm.orchestrator.incremental_detokenizer import IncrementalDetokenizer
from pymllm.orchestrator.ipc import Endpoints, WorkerReady, pull, push
from pymllm.orchestrator.token_bytes import TokenBytes, logprob_token_text
from pymllm.orchestrator.worker_common import run_worker

logger = logging.getLogger("detokenizer")


class DetokenizerManager:
    """Keeps one IncrementalDetokenizer per live request."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.states: Dict[str, IncrementalDetokenizer] = {}
        self._token_text_cache: Dict[int, str] = {}
        self._token_bytes = TokenBytes(tokenizer)
        # Requests the detokenizer already ended on a stop string the scheduler has not seen yet.
        self.stopped: set = set()

    def _token_text(self, token_id: int) -> str:
        """A logprob entry's name of the token: its text, or its bytes where they are part of a
        UTF-8 character (``bytes:\\x..``, as OpenAI names them)."""
        text = self._token_text_cache.get(token_id)
        if text is None:
            text = logprob_token_text(self.tokenizer.decode([token_id]), self._token_bytes(token_id))
            self._token_text_cache[token_id] = text
        return text

    def _logprobs(self, entries) -> Optional[List[Tuple[str, Optional[float], List[Tuple[str, float]]]]]:
        if entries is None:
            return None
        return [
            (self._token_text(tid), lp, [(self._token_text(t), v) for t, v in top])
            for tid, lp, top in entries
        ]

    def process(self, batch: BatchTokenIDOut) -> BatchRequestOutput:
        outputs = []
        for i, rid in enumerate(batch.rids):
            try:
                output = self._request_output(batch, i)
            except Exception:  # a bug in one request's decoding must cost that request, not the server
                logger.exception("detokenizing request %s failed; it ends with an error", rid)
                output = self._failed_output(rid, batch.finished_reasons[i] is not None)
            if output is not None:
                outputs.append(output)
        return BatchRequestOutput(outputs)

    def _failed_output(self, rid: str, scheduler_finished: bool) -> RequestOutput:
        """The final output of a request whose decoding raised: a 500 for its client; its later
        tokens, until the scheduler ends it, are dropped like those after a stop string."""
        self.states.pop(rid, None)
        if not scheduler_finished:
            self.stopped.add(rid)
        reason = FinishReason("abort", message="internal error while detokenizing the reply", status_code=500)
        return RequestOutput(rid=rid, text="", token_ids=[], finished=True, finish_reason=reason)

    def _request_output(self, batch: BatchTokenIDOut, i: int) -> Optional[RequestOutput]:
        """Request ``i`` of the batch as a text delta; None for a request already ended here."""
        rid = batch.rids[i]
        reason: Optional[FinishReason] = batch.finished_reasons[i]
        if rid in self.stopped:
            if reason is not None:
                self.stopped.discard(rid)
            return None
        state = self.states.get(rid)
        if state is None:
            tail = batch.prompt_tails[i] if batch.prompt_tails else None
            state = IncrementalDetokenizer(
                self.tokenizer, prompt_ids_tail=tail, skip_special_tokens=batch.skip_special_tokens[i],
                stop=batch.stop_strings[i],
            )
            self.states[rid] = state
        text, stopped, matched = state.add_tokens(batch.new_token_ids[i])
        if stopped and reason is None:
            reason = FinishReason("stop", matched=matched)
            self.stopped.add(rid)
        if reason is not None:
            if not stopped:
                text += state.finish()
            if isinstance(reason.matched, str) or stopped:
                reason = FinishReason("stop", matched=matched if stopped else reason.matched)
            del self.states[rid]
        return RequestOutput(
            rid=rid, text=text, token_ids=batch.new_token_ids[i], finished=reason is not None,
            finish_reason=reason, prompt_tokens=batch.prompt_tokens[i],
            completion_tokens=batch.completion_tokens[i], cached_tokens=batch.cached_tokens[i],
            logprobs=self._logprobs(batch.logprobs[i]),
            prompt_logprobs=self._logprobs(batch.prompt_logprobs[i] if batch.prompt_logprobs else None),
        )


def detokenizer_loop(config: GlobalConfig, model_config: ModelConfig, endpoints: Endpoints) -> None:
    from transformers import AutoTokenizer

    context = zmq.Context.instance()
    inbox = pull(context, endpoints.detokenizer_in)
    to_frontend = push(context, endpoints.frontend_in)
    manager = DetokenizerManager(AutoTokenizer.from_pretrained(model_config.tokenizer_path))
    start_serving("detokenizer", config.server.gc_warn_ms)
    to_frontend.send(WorkerReady("detokenizer", {}))
    while True:
        msg = inbox.recv()
        if isinstance(msg, BatchTokenIDOut):
            to_frontend.send(manager.process(msg))
        else:
            logger.error("unexpected message %r", type(msg).__name__)


def detokenizer_process_main(
    config: GlobalConfig, model_config: ModelConfig, endpoints: Endpoints, parent_conn
) -> None:
    run_worker(
        "detokenizer", config.server.log_level, endpoints.frontend_in, parent_conn,
        lambda: detokenizer_loop(config, model_config, endpoints),
    )

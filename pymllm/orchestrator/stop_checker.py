"""Decides when a request is done: EOS, stop token ids, stop strings, length limits."""

from __future__ import annotations

from typing import Iterable, Optional

from pymllm.engine.io_struct import FinishReason
from pymllm.orchestrator.request import Req


class StopChecker:
    def __init__(self, eos_token_ids: Iterable[int], tokenizer=None):
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.tokenizer = tokenizer

    def check(self, req: Req, context_length: int) -> Optional[FinishReason]:
        """Called after each new token of `req`."""
        params = req.sampling_params
        token = req.output_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            return FinishReason("stop", matched=token)
        if token in params.stop_token_ids:
            return FinishReason("stop", matched=token)
        if params.stop and self.tokenizer is not None:
            matched = self._match_stop_string(req)
            if matched is not None:
                return FinishReason("stop", matched=matched)
        if params.max_new_tokens is not None and len(req.output_ids) >= params.max_new_tokens:
            return FinishReason("length")
        if req.prompt_len + len(req.output_ids) >= context_length:
            return FinishReason("length")
        return None

    def _match_stop_string(self, req: Req) -> Optional[str]:
        # A stop string ending in the newest token lies within the last few tokens: each token
        # decodes to at least one character except partial UTF-8 pieces, so the window is the
        # longest stop string plus a margin for those.
        stops = req.sampling_params.stop
        window = max(len(s) for s in stops) + 4
        tail = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=False)
        for stop in stops:
            if stop in tail:
                return stop
        return None

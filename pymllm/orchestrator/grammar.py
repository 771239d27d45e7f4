"""Constrained decoding: JSON-schema grammars (xgrammar) that decide which tokens may come next.

A request with ``SamplingParams.json_schema`` gets a matcher when it is admitted. Before each of
its tokens is sampled the matcher's bitmask of allowed tokens becomes a mask on the logits
(``pymllm.executor.grammar_mask``); after it, the matcher accepts the token (the scheduler). The grammar is compiled once
per schema against the tokenizer's vocabulary (xgrammar: the precomputation of which tokens fit
each grammar state, the part that makes a mask cheap per step) and cached.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Dict, Sequence

logger = logging.getLogger(__name__)

# What OpenAI's response_format {"type": "json_object"} promises: some JSON object.
JSON_OBJECT_SCHEMA = json.dumps({"type": "object"})


def xgrammar_module():
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - a dependency; absent only in trimmed installs
        raise ValueError("json_schema needs the xgrammar package (pip install xgrammar)") from None
    return xgrammar


def check_json_schema(schema: str) -> None:
    """ValueError, naming the problem, unless ``schema`` is a JSON schema xgrammar can follow."""
    try:
        parsed = json.loads(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError("json_schema must be a JSON object (a schema)")
    try:
        xgrammar_module().Grammar.from_json_schema(schema, any_whitespace=False)
    except ValueError:
        raise
    except Exception as exc:  # xgrammar's own errors (RuntimeError, InvalidJSONError, ...)
        raise ValueError(f"json_schema cannot be followed: {exc}") from None


class Grammars:
    """Compiles and caches schema grammars for one tokenizer; hands out a matcher per request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(int(t) for t in stop_token_ids)
        self._compiler = None
        self._compiled: Dict[str, object] = {}

    def _compile(self, schema: str):
        xgr = xgrammar_module()
        if self._compiler is None:  # reading the vocabulary takes a while: only when first asked
            start = time.perf_counter()
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info)
            logger.info("Grammar support ready (vocabulary read) in %.2f s", time.perf_counter() - start)
        compiled = self._compiled.get(schema)
        if compiled is None:
            start = time.perf_counter()
            compiled = self._compiler.compile_grammar(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
            self._compiled[schema] = compiled
            logger.info("Compiled a JSON-schema grammar in %.3f s", time.perf_counter() - start)
        return compiled

    def matcher(self, schema: str):
        """A fresh matcher of ``schema`` (ValueError when it cannot be compiled)."""
        try:
            compiled = self._compile(schema)
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"json_schema cannot be followed: {exc}") from None
        return xgrammar_module().GrammarMatcher(compiled)

"""Constrained decoding: grammars (xgrammar) that decide which tokens may come next.

A request with ``SamplingParams.json_schema`` (a JSON value of that schema) or
``SamplingParams.structural_tag`` (xgrammar's structural-tag format: tagged JSON values, constant
strings, sequences, repetitions; the server's forced tool calls) gets a matcher when it is
admitted. Before each of its tokens is sampled the matcher's bitmask of allowed tokens becomes a
mask on the logits (``pymllm.executor.grammar_mask``); after it, the matcher accepts the token
(the scheduler). Each grammar is compiled against the tokenizer's vocabulary (xgrammar's
precomputation of which tokens fit each grammar state, the part that makes a mask cheap per step),
and xgrammar's compiler keeps it for the next request of the same spec.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def xgrammar_module():
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - a dependency; absent only in trimmed installs
        raise ValueError("constrained decoding needs the xgrammar package (pip install xgrammar)") from None
    return xgrammar


def _reason(exc: Exception) -> str:
    """xgrammar's message without its log prefix ("[09:03:04] /project/cpp/x.cc:4944: ")."""
    return _LOG_PREFIX.sub("", str(exc).strip())


def _parsed_object(text: str, name: str) -> dict:
    try:
        parsed = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object")
    return parsed


def build_grammar(json_schema: Optional[str] = None, structural_tag: Optional[str] = None):
    """The grammar of exactly one of the two specs: a compact JSON value (no free whitespace) of
    ``json_schema``, or ``structural_tag``. ValueError naming the problem when xgrammar cannot
    follow it."""
    if (json_schema is None) == (structural_tag is None):
        raise ValueError("give exactly one of json_schema and structural_tag")
    name = "json_schema" if json_schema is not None else "structural_tag"
    parsed = _parsed_object(json_schema if json_schema is not None else structural_tag, name)
    xgr = xgrammar_module()
    try:
        if json_schema is not None:
            return xgr.Grammar.from_json_schema(json_schema, any_whitespace=False)
        if parsed.get("type") != "structural_tag":
            raise ValueError('structural_tag must be {"type": "structural_tag", "format": ...}')
        return xgr.Grammar.from_structural_tag(structural_tag)
    except ValueError:
        raise
    except Exception as exc:  # xgrammar's own errors (RuntimeError, InvalidJSONError, ...)
        raise ValueError(f"{name} cannot be followed: {_reason(exc)}") from None


def check_grammar(json_schema: Optional[str] = None, structural_tag: Optional[str] = None) -> None:
    """ValueError, naming the problem, unless the output this asks for can be constrained."""
    build_grammar(json_schema, structural_tag)


# Compiled grammars kept for reuse, in xgrammar's own cache: a server sent many distinct schemas
# must not grow without bound.
GRAMMAR_CACHE_BYTES = 512 << 20


class Grammars:
    """Compiles grammars for one tokenizer (xgrammar's compiler caches them, up to
    GRAMMAR_CACHE_BYTES); hands out a matcher per request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(int(t) for t in stop_token_ids)
        self._compiler = None

    def compiled(self, json_schema: Optional[str] = None, structural_tag: Optional[str] = None):
        """The compiled grammar of the spec (from the compiler's cache after its first use)."""
        check_grammar(json_schema, structural_tag)  # the spec's own errors, named as elsewhere
        xgr = xgrammar_module()
        if self._compiler is None:  # reading the vocabulary takes a while: only when first asked
            start = time.perf_counter()
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
            logger.info("Grammar support ready (vocabulary read) in %.2f s", time.perf_counter() - start)
        start = time.perf_counter()
        try:
            if json_schema is not None:
                compiled = self._compiler.compile_json_schema(json_schema, any_whitespace=False)
            else:
                compiled = self._compiler.compile_structural_tag(structural_tag)
        except Exception as exc:
            raise ValueError(f"the grammar cannot be compiled: {_reason(exc)}") from None
        logger.debug("Grammar ready in %.3f s", time.perf_counter() - start)
        return compiled

    def matcher(self, json_schema: Optional[str] = None, structural_tag: Optional[str] = None):
        """A fresh matcher of the spec (ValueError when it cannot be constrained)."""
        return xgrammar_module().GrammarMatcher(self.compiled(json_schema, structural_tag))

"""Constrained decoding: JSON-schema grammars (xgrammar) that decide which tokens may come next.

A request with ``SamplingParams.json_schema`` gets a matcher when it is admitted. Before each of
its tokens is sampled the matcher's bitmask of allowed tokens becomes a mask on the logits
(``pymllm.executor.grammar_mask``); after it, the matcher accepts the token (the scheduler). The
output is ``json_prefix`` + a JSON value that follows the schema + ``json_suffix``: the prefix and
suffix let the server wrap the value in its tool-call tags. The grammar is compiled once per
(schema, prefix, suffix) against the tokenizer's vocabulary (xgrammar's precomputation of which
tokens fit each grammar state, the part that makes a mask cheap per step) and cached.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Dict, Sequence, Tuple

logger = logging.getLogger(__name__)

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def xgrammar_module():
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - a dependency; absent only in trimmed installs
        raise ValueError("json_schema needs the xgrammar package (pip install xgrammar)") from None
    return xgrammar


def _literal(text: str):
    """A grammar matching exactly ``text`` (a JSON string literal is a valid EBNF one)."""
    return xgrammar_module().Grammar.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")


def build_grammar(schema: str, prefix: str = "", suffix: str = ""):
    """prefix + a JSON value following ``schema`` (compact: no free whitespace) + suffix; ValueError
    naming the problem when the schema is not one xgrammar can follow."""
    try:
        parsed = json.loads(schema)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError("json_schema must be a JSON object (a schema)")
    xgr = xgrammar_module()
    try:
        value = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
        parts = ([_literal(prefix)] if prefix else []) + [value] + ([_literal(suffix)] if suffix else [])
        return xgr.Grammar.concat(*parts) if len(parts) > 1 else value
    except Exception as exc:  # xgrammar's own errors (RuntimeError, InvalidJSONError, ...)
        raise ValueError(f"json_schema cannot be followed: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    """xgrammar's message without its log prefix ("[09:03:04] /project/cpp/x.cc:4944: ")."""
    return _LOG_PREFIX.sub("", str(exc).strip())


def check_json_schema(schema: str, prefix: str = "", suffix: str = "") -> None:
    """ValueError, naming the problem, unless the output this asks for can be constrained."""
    build_grammar(schema, prefix, suffix)


class Grammars:
    """Compiles and caches grammars for one tokenizer; hands out a matcher per request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(int(t) for t in stop_token_ids)
        self._compiler = None
        self._compiled: Dict[Tuple[str, str, str], object] = {}

    def compiled(self, schema: str, prefix: str = "", suffix: str = ""):
        """The compiled grammar of (schema, prefix, suffix), from the cache after its first use."""
        key = (schema, prefix, suffix)
        compiled = self._compiled.get(key)
        if compiled is not None:
            return compiled
        grammar = build_grammar(schema, prefix, suffix)
        xgr = xgrammar_module()
        if self._compiler is None:  # reading the vocabulary takes a while: only when first asked
            start = time.perf_counter()
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info)
            logger.info("Grammar support ready (vocabulary read) in %.2f s", time.perf_counter() - start)
        start = time.perf_counter()
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except Exception as exc:
            raise ValueError(f"json_schema cannot be followed: {_reason(exc)}") from None
        self._compiled[key] = compiled
        logger.info("Compiled a JSON-schema grammar in %.3f s", time.perf_counter() - start)
        return compiled

    def matcher(self, schema: str, prefix: str = "", suffix: str = ""):
        """A fresh matcher of the output (ValueError when it cannot be constrained)."""
        return xgrammar_module().GrammarMatcher(self.compiled(schema, prefix, suffix))

"""Constrained decoding: grammars (xgrammar) that decide which tokens may come next.

A request with ``SamplingParams.json_schema`` (a JSON value of that schema),
``SamplingParams.structural_tag`` (xgrammar's structural-tag format: tagged JSON values, constant
strings, sequences, repetitions; the server's forced tool calls), ``SamplingParams.regex`` (a
regular expression the whole output matches) or ``SamplingParams.ebnf`` (an EBNF grammar whose
``root`` rule the output is) gets a matcher when it is admitted. Before each of its tokens is
sampled the matcher's bitmask of allowed tokens becomes a mask on the logits
(``pymllm.executor.grammar_mask``); after it, the matcher accepts the token (the scheduler). Each
grammar is compiled against the tokenizer's vocabulary (xgrammar's precomputation of which tokens
fit each grammar state, the part that makes a mask cheap per step), and xgrammar's compiler keeps
it for the next request of the same spec.

Compiling takes milliseconds per schema (and the first use reads the whole vocabulary, ~0.1 s for
49k tokens), so it runs on a worker thread (``Grammars.submit``): xgrammar releases the GIL while
it compiles, and the scheduler keeps stepping the running requests while a new request's grammar
is built. The request waits in ``PendingGrammars`` until then.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, List, Optional, Sequence, Tuple

from pymllm.sampling_params import GRAMMAR_FIELDS

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


def _the_spec(json_schema: Optional[str], structural_tag: Optional[str], regex: Optional[str],
              ebnf: Optional[str]) -> Tuple[str, str]:
    given = [(kind, text) for kind, text in zip(GRAMMAR_FIELDS, (json_schema, structural_tag, regex, ebnf))
             if text is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(GRAMMAR_FIELDS)}")
    kind, text = given[0]
    if not isinstance(text, str):
        raise ValueError(f"{kind} must be a string")
    return kind, text


def build_grammar(json_schema: Optional[str] = None, structural_tag: Optional[str] = None,
                  regex: Optional[str] = None, ebnf: Optional[str] = None):
    """The grammar of exactly one spec: a compact JSON value (no free whitespace) of
    ``json_schema``, ``structural_tag``, a text that matches ``regex`` whole, or the ``root`` rule
    of the EBNF grammar ``ebnf``. ValueError naming the problem when xgrammar cannot follow it."""
    kind, text = _the_spec(json_schema, structural_tag, regex, ebnf)
    xgr = xgrammar_module()
    try:
        if kind == "json_schema":
            _parsed_object(text, kind)
            return xgr.Grammar.from_json_schema(text, any_whitespace=False)
        if kind == "structural_tag":
            if _parsed_object(text, kind).get("type") != "structural_tag":
                raise ValueError('structural_tag must be {"type": "structural_tag", "format": ...}')
            return xgr.Grammar.from_structural_tag(text)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        return xgr.Grammar.from_ebnf(text)
    except ValueError:
        raise
    except Exception as exc:  # xgrammar's own errors (RuntimeError, InvalidJSONError, ...)
        raise ValueError(f"{kind} cannot be followed: {_reason(exc)}") from None


def check_grammar(json_schema: Optional[str] = None, structural_tag: Optional[str] = None,
                  regex: Optional[str] = None, ebnf: Optional[str] = None) -> None:
    """ValueError, naming the problem, unless the output this asks for can be constrained."""
    build_grammar(json_schema, structural_tag, regex, ebnf)


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar whose output is exactly one of ``choices`` (vLLM's ``choice``)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("choice must be a list of non-empty strings")
    # JSON's string escapes (quote, backslash, control characters) are EBNF's.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# Compiled grammars kept for reuse, in xgrammar's own cache: a server sent many distinct schemas
# must not grow without bound.
GRAMMAR_CACHE_BYTES = 512 << 20


class Grammars:
    """Compiles grammars for one tokenizer (xgrammar's compiler caches them, up to
    GRAMMAR_CACHE_BYTES), here or on a worker thread; hands out a matcher per request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        # Imported now, at start-up: the import takes 0.1-0.5 s, which the first constrained
        # request would otherwise cost the scheduler loop (its spec is checked there on arrival).
        xgrammar_module()
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(int(t) for t in stop_token_ids)
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._worker: Optional[ThreadPoolExecutor] = None

    def _ready_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:  # reading the vocabulary takes a while: only when first asked
                xgr = xgrammar_module()
                start = time.perf_counter()
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=GRAMMAR_CACHE_BYTES)
                logger.info("Grammar support ready (vocabulary read) in %.2f s", time.perf_counter() - start)
            return self._compiler

    def compiled(self, json_schema: Optional[str] = None, structural_tag: Optional[str] = None,
                 regex: Optional[str] = None, ebnf: Optional[str] = None):
        """The compiled grammar of the spec (from the compiler's cache after its first use): the
        grammar is built once (the spec's own errors named as by check_grammar), then compiled."""
        grammar = build_grammar(json_schema, structural_tag, regex, ebnf)
        compiler = self._ready_compiler()
        start = time.perf_counter()
        try:
            compiled = compiler.compile_grammar(grammar)
        except Exception as exc:
            raise ValueError(f"the grammar cannot be compiled: {_reason(exc)}") from None
        logger.debug("Grammar ready in %.3f s", time.perf_counter() - start)
        return compiled

    def submit(self, json_schema: Optional[str] = None, structural_tag: Optional[str] = None,
               regex: Optional[str] = None, ebnf: Optional[str] = None) -> Future:
        """``compiled(...)`` on the worker thread: a future of the compiled grammar (or of the
        ValueError saying why there is none)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        return self._worker.submit(self.compiled, json_schema, structural_tag, regex, ebnf)

    @staticmethod
    def matcher_of(compiled):
        """A fresh matcher of a compiled grammar: one per request, since it follows its tokens."""
        return xgrammar_module().GrammarMatcher(compiled)

    def matcher(self, json_schema: Optional[str] = None, structural_tag: Optional[str] = None,
                regex: Optional[str] = None, ebnf: Optional[str] = None):
        """A fresh matcher of the spec, compiled here (ValueError when it cannot be constrained)."""
        return self.matcher_of(self.compiled(json_schema, structural_tag, regex, ebnf))


# How long an otherwise idle scheduler waits for a grammar before it looks at its inbox again.
GRAMMAR_POLL_S = 0.005


class PendingGrammars:
    """Requests whose grammar is being compiled, in arrival order, with their futures."""

    def __init__(self) -> None:
        self._pending: List[Tuple[Any, Future]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, req, future: Future) -> None:
        self._pending.append((req, future))

    def take_done(self) -> List[Tuple[Any, Future]]:
        """The requests whose compile has ended (well or not), in arrival order, removed from here."""
        done = [(req, future) for req, future in self._pending if future.done()]
        if done:
            self._pending = [(req, future) for req, future in self._pending if not future.done()]
        return done

    def remove(self, rid: str):
        """The pending request ``rid`` (its compile cancelled if not started), or None."""
        for i, (req, future) in enumerate(self._pending):
            if req.rid == rid:
                future.cancel()
                del self._pending[i]
                return req
        return None

    def wait(self, timeout: float = GRAMMAR_POLL_S) -> None:
        """Block until a compile ends or ``timeout`` passes."""
        if self._pending:
            wait([future for _, future in self._pending], timeout=timeout, return_when=FIRST_COMPLETED)

"""Per-request sampling parameters, with defaults from the model's generation_config.json."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Optional

# Values a request leaves as None take the model's generation_config defaults, then these.
_FALLBACKS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
# Fields whose JSON value must be an integer / a number. /generate passes its dict through
# unchecked, and a float top_k or top_logprobs reaches torch.topk in the scheduler, which
# fails there and takes the engine down.
_INT_FIELDS = ("max_new_tokens", "top_k", "top_logprobs", "seed")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
# The tokenizer's Rust decode refuses a non-bool skip_special_tokens, in the detokenizer process.
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "logprobs", "prompt_logprobs")
# The fields that give a grammar (at most one per request; pymllm.orchestrator.grammar).
GRAMMAR_FIELDS = ("json_schema", "structural_tag", "regex", "ebnf")
# generation_config.json key -> SamplingParams field
_GENERATION_CONFIG_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = None  # None: until EOS or the context limit
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # -1 or 0: disabled
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: bool = False
    top_logprobs: int = 0
    # Score the prompt: each prompt token after the first gets its logprob under the model
    # (and top_logprobs alternatives), as the legacy completions API's echo + logprobs reports.
    prompt_logprobs: bool = False
    # token id -> value added to its logit before sampling (OpenAI's logit_bias, in [-100, 100])
    logit_bias: Dict[int, float] = field(default_factory=dict)
    # A JSON schema (as a JSON string) the output must follow: only tokens that keep it valid are
    # sampled (response_format json_schema / json_object; pymllm.orchestrator.grammar).
    json_schema: Optional[str] = None
    # Or an xgrammar structural tag (as a JSON string): tagged JSON values, constant strings,
    # sequences and repetitions (the server's forced tool calls).
    structural_tag: Optional[str] = None
    # Or a regular expression the whole output must match, or an EBNF grammar (xgrammar's dialect)
    # whose `root` rule it must be (SGLang's names; vLLM's structured_outputs regex / grammar / choice).
    regex: Optional[str] = None
    ebnf: Optional[str] = None

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> "SamplingParams":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        stop = data.get("stop")
        if isinstance(stop, str):
            data["stop"] = [stop]
        elif stop is None:
            data["stop"] = []
        if data.get("stop_token_ids") is None:
            data["stop_token_ids"] = []
        data["logit_bias"] = _token_bias(data.get("logit_bias"))
        params = cls(**data)
        params.verify()
        return params

    def with_defaults(self, generation_defaults: Optional[dict] = None) -> "SamplingParams":
        """Fill unset values from generation_config.json, then from neutral fallbacks."""
        generation_defaults = generation_defaults or {}
        updates = {}
        for key, name in _GENERATION_CONFIG_KEYS.items():
            if getattr(self, name) is None:
                value = generation_defaults.get(key)
                updates[name] = value if value is not None else _FALLBACKS[name]
        out = replace(self, **updates)
        if out.top_k == 0:
            out.top_k = -1
        return out

    @property
    def is_greedy(self) -> bool:
        return self.temperature is not None and self.temperature <= 1e-5 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        """Whether sampling reads the tokens seen so far (repetition, presence or frequency
        penalty)."""
        return (self.repetition_penalty not in (None, 1.0) or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def needs_sampler(self) -> bool:
        """Whether the logits need more than an argmax: sampling, penalties, a logit bias,
        logprobs or a grammar."""
        return (not self.is_greedy or self.uses_penalties or bool(self.logit_bias) or self.logprobs
                or self.top_logprobs > 0 or self.constrained)

    @property
    def grammar_spec(self) -> Dict[str, str]:
        """The grammar that decides which tokens may come next, as {kind: text} (empty: none);
        the keyword arguments of pymllm.orchestrator.grammar's check_grammar and Grammars."""
        return {kind: getattr(self, kind) for kind in GRAMMAR_FIELDS if getattr(self, kind) is not None}

    @property
    def constrained(self) -> bool:
        """Whether a grammar decides which tokens may come next (read for every request at every
        decode step, through needs_sampler: four attribute tests, no dict)."""
        return (self.json_schema is not None or self.structural_tag is not None or self.regex is not None
                or self.ebnf is not None)

    def verify(self) -> None:
        def check(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(message)

        for name in _INT_FIELDS:
            value = getattr(self, name)
            check(value is None or _is_int(value), f"{name} must be an integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            check(value is None or _is_int(value) or isinstance(value, float),
                  f"{name} must be a number, got {value!r}")
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        check(isinstance(self.stop, list), "stop must be a string or a list of strings")
        check(isinstance(self.stop_token_ids, list), "stop_token_ids must be a list of token ids")
        if self.max_new_tokens is not None:
            check(self.max_new_tokens >= 0, f"max_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature is not None:
            check(0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_p is not None:
            check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            check(self.top_k >= -1, f"top_k must be -1 (disabled) or >= 0, got {self.top_k}")
        if self.min_p is not None:
            check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty is not None:
            check(0.0 < self.repetition_penalty <= 10.0,
                  f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        check(-2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(0 <= self.top_logprobs <= 20, f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings")
        check(len(self.stop) <= 16, "at most 16 stop strings")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be non-negative integers")
        check(all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()),
              "logit_bias values must be in [-100, 100]")
        spec = self.grammar_spec
        if spec:
            check(len(spec) == 1, f"give one of {', '.join(GRAMMAR_FIELDS[:-1])} and {GRAMMAR_FIELDS[-1]}, "
                                  f"not {' and '.join(spec)}")
            (kind, text), = spec.items()
            check(isinstance(text, str), "json_schema and structural_tag are JSON documents as strings"
                  if kind in ("json_schema", "structural_tag") else f"{kind} must be a string")
            from pymllm.orchestrator.grammar import check_grammar

            check_grammar(**spec)


def _is_int(value: object) -> bool:
    # bool is an int subclass, but true/false for a count is a client mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _token_bias(bias) -> Dict[int, float]:
    """logit_bias with integer token ids: JSON bodies carry the ids as strings ("50256")."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise ValueError("logit_bias must be an object of token id -> bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if token < 0:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"logit_bias values must be numbers, got {value!r}")
        out[token] = float(value)
    return out

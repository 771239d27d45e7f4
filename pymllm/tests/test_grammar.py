"""Constrained decoding (SamplingParams.json_schema): the scheduler's outputs under a schema,
with the xgrammar library's own matcher as the judge of validity, and the pieces on their own."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from pymllm.engine.io_struct import TokenizedGenerateReq
from pymllm.executor.grammar_mask import allowed_token_mask
from pymllm.layers.sampler import Sampler, SamplingBatchInfo
from pymllm.orchestrator.grammar import Grammars, check_grammar
from pymllm.parsers.tool_call import HermesToolCallParser
from pymllm.orchestrator.scheduler import RequestRejected
from pymllm.sampling_params import SamplingParams
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy, make_scheduler, run_requests

xgr = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": [1, 2, 3]}, "tags": {"type": "array",
               "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["ok", "size", "tags"],
    "additionalProperties": False,
}
PROMPTS = [[5, 17, 300, 42, 7], [11, 12, 13], [400, 2, 90, 91]]


@pytest.fixture(scope="module")
def model_dir():
    return tiny_model_dir("qwen3")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _constrained(**kw):
    return SamplingParams(max_new_tokens=64, json_schema=json.dumps(SCHEMA), **kw).with_defaults({})


def _check_output(req, tokenizer):
    assert req.finish_reason.type == "stop", req.finish_reason
    text = tokenizer.decode(req.output_ids, skip_special_tokens=True)
    value = json.loads(text)
    assert set(value) == {"ok", "size", "tags"} and isinstance(value["ok"], bool)
    assert value["size"] in (1, 2, 3) and len(value["tags"]) <= 2 and set(value["tags"]) <= {"a", "b"}
    return text


def test_outputs_follow_the_schema(model_dir, tokenizer):
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    assert sched.overlap  # constrained steps must not run ahead of their own tokens
    params = [_constrained(temperature=0.0), _constrained(temperature=1.0, seed=3), greedy(12, ignore_eos=True)]
    reqs = run_requests(sched, PROMPTS, params)
    for i in range(2):
        _check_output(reqs[str(i)], tokenizer)
    # The unconstrained request beside them is what it is alone.
    alone = run_requests(make_scheduler(model_dir, max_total_tokens=1024), [PROMPTS[2]], [greedy(12, ignore_eos=True)])
    assert reqs["2"].output_ids == alone["0"].output_ids


def test_ignore_eos_still_ends_with_the_grammar(model_dir, tokenizer):
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    reqs = run_requests(sched, PROMPTS[:1], [_constrained(temperature=0.0, ignore_eos=True)])
    _check_output(reqs["0"], tokenizer)


def test_json_object_and_sampling_many_seeds(model_dir, tokenizer):
    sched = make_scheduler(model_dir, max_total_tokens=2048)
    schema = json.dumps({"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]})
    params = [SamplingParams(max_new_tokens=48, temperature=1.0, seed=s, json_schema=schema).with_defaults({})
              for s in range(6)]
    reqs = run_requests(sched, [PROMPTS[0]] * 6, params)
    for req in reqs.values():
        if req.finish_reason.type == "stop":
            assert isinstance(json.loads(tokenizer.decode(req.output_ids, skip_special_tokens=True))["x"], bool)
        else:  # cut at max_new_tokens: still a prefix the grammar accepts
            matcher = xgr.GrammarMatcher(sched.grammars.compiled(schema))
            assert all(matcher.accept_token(t) for t in req.output_ids)


def _tool_calls_tag(stop_after_first: bool) -> str:
    """One or more calls of f (arguments: SCHEMA) in Hermes tags, as the server builds them."""
    tag = {"type": "tag", "begin": '<tool_call>\n{"name": "f", "arguments": ',
           "content": {"type": "json_schema", "json_schema": SCHEMA, "max_whitespace_cnt": 1}, "end": "}\n</tool_call>"}
    fmt = {"type": "tags_with_separator", "tags": [tag], "separator": "\n", "at_least_one": True,
           "stop_after_first": stop_after_first}
    return json.dumps({"type": "structural_tag", "format": fmt})


@pytest.mark.parametrize("stop_after_first", [True, False])
def test_structural_tags_make_tool_calls(model_dir, tokenizer, stop_after_first):
    sched = make_scheduler(model_dir, max_total_tokens=2048)
    params = [SamplingParams(max_new_tokens=160, temperature=t, seed=s, structural_tag=_tool_calls_tag(stop_after_first))
              .with_defaults({}) for t, s in ((0.0, 0), (1.0, 1), (1.0, 2))]
    finished = 0
    for req in run_requests(sched, PROMPTS, params).values():
        if req.finish_reason.type != "stop":  # cut at max_new_tokens
            continue
        finished += 1
        # The server's own tool-call parser reads every call, and no text besides.
        content, calls = HermesToolCallParser().parse(tokenizer.decode(req.output_ids, skip_special_tokens=True))
        assert content is None and len(calls) >= 1 and (len(calls) == 1 or not stop_after_first)
        for call in calls:
            assert call.name == "f" and set(json.loads(call.arguments)) == {"ok", "size", "tags"}
    assert finished
    with pytest.raises(ValueError, match="give one of json_schema, structural_tag, regex and ebnf, not json_schema and structural_tag"):
        SamplingParams.from_dict({"json_schema": "{}", "structural_tag": _tool_calls_tag(True)})
    with pytest.raises(ValueError, match="structural_tag must be"):
        check_grammar(structural_tag=json.dumps({"type": "tag"}))


def test_a_schema_that_cannot_be_followed_is_refused(model_dir):
    with pytest.raises(ValueError, match="not valid JSON"):
        check_grammar("{nope")
    with pytest.raises(ValueError, match=r"^json_schema cannot be followed: Unsupported type \"frob\"$"):
        check_grammar(json.dumps({"type": "frob"}))
    with pytest.raises(ValueError, match="JSON documents as strings"):
        SamplingParams.from_dict({"json_schema": {"type": "object"}})
    sched = make_scheduler(model_dir, max_total_tokens=256)
    bad = SamplingParams(max_new_tokens=4, json_schema=json.dumps({"type": "frob"})).with_defaults({})
    with pytest.raises(RequestRejected, match="cannot be followed"):
        sched.add_request(TokenizedGenerateReq("r", [1, 2, 3], bad))


def test_a_refused_token_ends_the_request_with_an_error():
    class Refusing:
        def accept_token(self, token):
            return False

    from pymllm.orchestrator.request import Req
    from pymllm.orchestrator.scheduler import Scheduler

    req = Req(rid="r", origin_input_ids=[1], sampling_params=_constrained(), seed=0, grammar=Refusing())
    reason = Scheduler._advance_grammar(req, 5)
    assert reason.type == "abort" and reason.status_code == 500


def test_the_mask_follows_the_matcher(tokenizer):
    grammars = Grammars(tokenizer, len(tokenizer) + 7, [tokenizer.eos_token_id])
    matcher = grammars.matcher(json.dumps({"enum": ["ab"]}))
    mask = allowed_token_mask([None, matcher], len(tokenizer) + 7, "cpu")
    assert mask.shape == (2, len(tokenizer) + 7) and bool(mask[0].all())
    allowed = mask[1].nonzero().flatten().tolist()
    # The independent judge: a fresh matcher accepts exactly those first tokens.
    for token in range(len(tokenizer)):
        probe = xgr.GrammarMatcher(grammars.compiled(json.dumps({"enum": ["ab"]})))
        assert probe.accept_token(token) == (token in allowed), tokenizer.decode([token])
    assert not mask[1, len(tokenizer):].any()  # ids past the tokenizer (LM-head padding) never
    assert allowed_token_mask([None, None], 10, "cpu") is None


def test_the_sampler_takes_only_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    allowed = torch.zeros(3, 50, dtype=torch.bool)
    allowed[0, [3, 7]] = True
    allowed[1, 49] = True
    allowed[2] = True
    params = [SamplingParams(temperature=t, seed=1).with_defaults({}) for t in (0.0, 1.0, 1.0)]
    for step in range(20):
        info = SamplingBatchInfo.from_params(params, seeds=[1, 2, 3], steps=[step] * 3, vocab_size=50, device="cpu")
        info.allowed_tokens = allowed
        ids = Sampler()(logits, info).next_token_ids.tolist()
        assert ids[0] == max((3, 7), key=lambda t: logits[0, t]) and ids[1] == 49


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_outputs_follow_the_schema_on_the_gpu_fast_path(tokenizer):
    """bf16, FlashInfer, CUDA-graph decode: the mask applies to the graph's logits, and steps of
    constrained requests are not launched ahead of their tokens."""
    pytest.importorskip("flashinfer")
    # FlashInfer's SM90 prefill needs a head_dim of 64, 128 or 256.
    gpu_model = tiny_model_dir("qwen3", head_dim=128, hidden_size=256, intermediate_size=512,
                               num_attention_heads=4, num_key_value_heads=2)
    sched = make_scheduler(gpu_model, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                           max_total_tokens=1024)
    assert sched.runner.cuda_graph_runner is not None
    params = [_constrained(temperature=0.0), _constrained(temperature=1.0, seed=3), greedy(12, ignore_eos=True)]
    reqs = run_requests(sched, PROMPTS, params)
    for i in range(2):
        _check_output(reqs[str(i)], tokenizer)


def test_random_schemas_compile_or_are_refused_by_name():
    """Whatever a client sends as a schema, the answer is a grammar or a ValueError (a 400), never
    another exception from xgrammar."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    keys = ["type", "properties", "items", "required", "enum", "const", "anyOf", "oneOf", "allOf", "minimum",
            "maximum", "pattern", "format", "minItems", "maxItems", "additionalProperties", "$ref", "$defs",
            "minLength", "maxLength", "not", "prefixItems"]
    leaf = st.one_of(st.sampled_from(["object", "array", "string", "number", "integer", "boolean", "null", "frob"]),
                     st.integers(-5, 5), st.text(max_size=5), st.booleans(), st.none())
    schemas = st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(keys), inner, max_size=4)), max_leaves=12)

    @hypothesis.settings(max_examples=150, deadline=None)
    @hypothesis.given(schemas)
    def compile_or_refuse(schema):
        try:
            check_grammar(json.dumps(schema))
        except ValueError:
            pass

    compile_or_refuse()


# ---------------------------------------------------------------- compiling beside the running requests
class _GatedGrammars:
    """The scheduler's Grammars with compiles that end only when the test says so."""

    def __init__(self, grammars):
        self.real = grammars
        self.futures = []

    def submit(self, json_schema=None, structural_tag=None):
        from concurrent.futures import Future

        future = Future()
        future.spec = (json_schema, structural_tag)
        self.futures.append(future)
        return future

    def finish(self, index=0):
        future = self.futures[index]
        future.set_result(self.real.compiled(*future.spec))

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_running_requests_step_while_a_grammar_compiles(model_dir, tokenizer):
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    gated = sched.grammars = _GatedGrammars(sched.grammars)
    plain = sched.add_request(TokenizedGenerateReq("plain", PROMPTS[2], greedy(12, ignore_eos=True)))
    constrained = sched.add_request(TokenizedGenerateReq("json", PROMPTS[0], _constrained(temperature=0.0)))
    assert len(gated.futures) == 1 and constrained not in sched.waiting and sched.stats()["queued"] == 2
    for _ in range(5):
        sched.step()
    assert len(plain.output_ids) == 5 and not constrained.output_ids and constrained.grammar is None
    gated.finish()
    for _ in range(200):
        if not sched.has_work():
            break
        sched.step()
    assert not sched.has_work()
    _check_output(constrained, tokenizer)
    alone = run_requests(make_scheduler(model_dir, max_total_tokens=1024), [PROMPTS[2]], [greedy(12, ignore_eos=True)])
    assert plain.output_ids == alone["0"].output_ids
    sched.verify_kv_accounting()


def test_a_grammar_that_cannot_be_compiled_refuses_its_request(model_dir):
    sched = make_scheduler(model_dir, max_total_tokens=256)
    gated = sched.grammars = _GatedGrammars(sched.grammars)
    req = sched.add_request(TokenizedGenerateReq("r", PROMPTS[0], _constrained()))
    gated.futures[0].set_exception(ValueError("the grammar cannot be compiled: too large"))
    assert sched.step() == [req]
    assert req.finished and req.finish_reason.status_code == 400
    assert req.finish_reason.message == "the grammar cannot be compiled: too large"
    assert not sched.has_work()

    req = sched.add_request(TokenizedGenerateReq("s", PROMPTS[0], _constrained()))
    gated.futures[1].set_exception(RuntimeError("vocabulary unreadable"))
    assert sched.step() == [req] and req.finish_reason.status_code == 500
    sched.verify_kv_accounting()


def test_aborting_a_request_while_its_grammar_compiles(model_dir):
    sched = make_scheduler(model_dir, max_total_tokens=256)
    gated = sched.grammars = _GatedGrammars(sched.grammars)
    req = sched.add_request(TokenizedGenerateReq("r", PROMPTS[0], _constrained()))
    assert sched.abort("r") is req and req.finish_reason.type == "abort"
    assert gated.futures[0].cancelled() and not sched.has_work()
    assert sched.step() == [] and not req.output_ids


def test_grammars_compile_on_a_worker_thread(tokenizer):
    import threading

    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    seen = []
    compiled = grammars.compiled
    grammars.compiled = lambda *spec: seen.append(threading.current_thread().name) or compiled(*spec)
    matcher = grammars.matcher_of(grammars.submit(json.dumps({"enum": ["ab"]})).result(timeout=60))
    assert seen and seen[0].startswith("grammar") and seen[0] != threading.current_thread().name
    assert not matcher.is_terminated()
    failed = grammars.submit(structural_tag=json.dumps({"type": "tag"}))
    with pytest.raises(ValueError, match="structural_tag must be"):
        failed.result(timeout=60)


# ---------------------------------------------------------------- regex, EBNF and choices
def test_regex_outputs_match_it_whole(model_dir, tokenizer):
    import re

    pattern = r"(yes|no)-[0-9]{2,3}( [a-c]+)?"
    sched = make_scheduler(model_dir, max_total_tokens=2048)
    params = [SamplingParams(max_new_tokens=24, temperature=t, seed=s, regex=pattern).with_defaults({})
              for t, s in ((0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3))]
    finished = 0
    for req in run_requests(sched, [PROMPTS[i % 3] for i in range(4)], params).values():
        text = tokenizer.decode(req.output_ids, skip_special_tokens=True)
        if req.finish_reason.type == "stop":
            finished += 1
            assert re.fullmatch(pattern, text), text  # Python's own regex engine is the judge
        else:  # cut at max_new_tokens: a prefix the grammar still accepts
            matcher = xgr.GrammarMatcher(sched.grammars.compiled(regex=pattern))
            assert all(matcher.accept_token(t) for t in req.output_ids)
    assert finished


def test_choices_and_ebnf_outputs(model_dir, tokenizer):
    from pymllm.orchestrator.grammar import choice_ebnf

    choices = ['say "hi"', "back\\slash", "naïve", "x"]
    sched = make_scheduler(model_dir, max_total_tokens=2048)
    ebnf = choice_ebnf(choices)
    params = [SamplingParams(max_new_tokens=16, temperature=1.0, seed=s, ebnf=ebnf).with_defaults({})
              for s in range(6)]
    for req in run_requests(sched, [PROMPTS[s % 3] for s in range(6)], params).values():
        assert req.finish_reason.type == "stop"
        assert tokenizer.decode(req.output_ids, skip_special_tokens=True) in choices
    # Each choice, tokenized, is a whole sentence of the grammar; a near miss is not.
    for text, whole in [*((c, True) for c in choices), ("say hi", False), ("naive", False)]:
        matcher = xgr.GrammarMatcher(sched.grammars.compiled(ebnf=ebnf))
        ids = tokenizer.encode(text, add_special_tokens=False)
        accepted = all(matcher.accept_token(t) for t in ids)
        assert (accepted and matcher.accept_token(tokenizer.eos_token_id)) == whole, text
    with pytest.raises(ValueError, match="non-empty strings"):
        choice_ebnf(["a", ""])


def test_regex_and_ebnf_are_checked_like_schemas():
    with pytest.raises(ValueError, match=r"^regex cannot be followed: Regex parsing error"):
        SamplingParams.from_dict({"regex": "(a"})
    with pytest.raises(ValueError, match=r"^ebnf cannot be followed: EBNF parser error"):
        SamplingParams.from_dict({"ebnf": "root ::= "})
    with pytest.raises(ValueError, match="not json_schema and regex"):
        SamplingParams.from_dict({"json_schema": "{}", "regex": "a"})
    with pytest.raises(ValueError, match="regex must be a string"):
        SamplingParams.from_dict({"regex": 5})
    assert SamplingParams.from_dict({"ebnf": 'root ::= "a"'}).grammar_spec == {"ebnf": 'root ::= "a"'}
    assert SamplingParams.from_dict({}).grammar_spec == {} and not SamplingParams().constrained

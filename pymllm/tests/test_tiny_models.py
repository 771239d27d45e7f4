"""The tiny tokenizer, chat template and random checkpoints used by the rest of the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pymllm.testing.tiny_models import (
    ENDOFTEXT,
    IM_END,
    MARKUP_TOKENS,
    SPECIAL_TOKENS,
    build_tiny_checkpoint,
    build_tiny_tokenizer,
    tiny_model_dir,
    tiny_token_ids,
)

transformers = pytest.importorskip("transformers")

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def render(tokenizer, messages, **kw) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


# ---- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_basics(tokenizer) -> None:
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    assert 1000 <= len(tokenizer) <= 2000
    assert len(tokenizer) == tiny_token_ids()["vocab_size"]
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == ENDOFTEXT
    assert tokenizer.bos_token is None
    assert tokenizer("hello").input_ids == tokenizer.encode("hello", add_special_tokens=False)


@pytest.mark.parametrize("text", [
    "héllo 你好 🙂",
    "The weather in Paris is sunny with a high of 24 degrees.",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    "def f(x):\n    return x * 2\n\n\ttabs  and  spaces ",
    "Unseen words: zyxwvut qqq ÆØÅ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
])
def test_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_multibyte_text_splits_inside_a_character(tokenizer) -> None:
    # Streaming detokenizers need cases where one token holds part of a UTF-8 character.
    ids = tokenizer.encode("héllo 你好 🙂", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces)
    assert tokenizer.decode(ids) == "héllo 你好 🙂"
    assert len(ids) < len("héllo 你好 🙂".encode()), "common text should be merged"


@pytest.mark.parametrize("token", SPECIAL_TOKENS + MARKUP_TOKENS)
def test_added_tokens_are_single_tokens(tokenizer, token: str) -> None:
    token_id = tiny_token_ids()[token]
    assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    ids = tokenizer.encode(f"a{token}b", add_special_tokens=False)
    assert token_id in ids and len(ids) == 3


def test_skip_special_tokens_keeps_markup(tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>hi<think>x</think><tool_call>{}</tool_call><|im_end|>",
                           add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi<think>x</think><tool_call>{}</tool_call>"


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_tokenizer(tmp_path / "a") / "tokenizer.json"
    b = build_tiny_tokenizer(tmp_path / "b") / "tokenizer.json"
    assert a.read_bytes() == b.read_bytes()


# ---- chat template ---------------------------------------------------------------------------


def test_chat_template_plain(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    assert render(tokenizer, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(tokenizer, messages[1:2]) == "<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_enable_thinking(tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    on = render(tokenizer, messages, add_generation_prompt=True, enable_thinking=True)
    off = render(tokenizer, messages, add_generation_prompt=True, enable_thinking=False)
    assert on == render(tokenizer, messages, add_generation_prompt=True)
    assert on.endswith("<|im_start|>assistant\n")
    assert off == on + "<think>\n\n</think>\n\n"


def test_chat_template_reasoning_kept_only_after_last_user(tokenizer) -> None:
    messages = [{"role": "user", "content": "a"},
                {"role": "assistant", "content": "<think>\nold\n</think>\n\nA1"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "B1", "reasoning_content": "new"}]
    text = render(tokenizer, messages)
    assert "old" not in text and "<|im_start|>assistant\nA1<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\nnew\n</think>\n\nB1<|im_end|>\n" in text


def test_chat_template_tools(tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    text = render(tokenizer, messages, tools=TOOLS, add_generation_prompt=True)
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in system
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system
    assert rest == "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
    no_system = render(tokenizer, messages[1:], tools=TOOLS)
    assert no_system.startswith("<|im_start|>system\n# Tools")


def test_chat_template_tool_calls_and_responses(tokenizer) -> None:
    def call(arguments):
        return {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}

    as_dict = [{"role": "user", "content": "Weather in Paris and Rome?"},
               {"role": "assistant", "content": "", "tool_calls": [call({"city": "Paris"}), call({"city": "Rome"})]},
               {"role": "tool", "content": '{"temp": 20}'},
               {"role": "tool", "content": '{"temp": 25}'},
               {"role": "assistant", "content": "Both are warm."}]
    as_string = json.loads(json.dumps(as_dict))
    for message_call in as_string[1]["tool_calls"]:
        message_call["function"]["arguments"] = json.dumps(message_call["function"]["arguments"])
    text = render(tokenizer, as_dict, tools=TOOLS)
    assert text == render(tokenizer, as_string, tools=TOOLS)
    assert (
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n"
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 20}\n</tool_response>\n<tool_response>\n"
        "{\"temp\": 25}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nBoth are warm.<|im_end|>\n"
    ) in text
    with_text = [as_dict[0], {"role": "assistant", "content": "Checking.", "tool_calls": [call({"city": "Oslo"})]}]
    assert "assistant\nChecking.\n<tool_call>\n" in render(tokenizer, with_text)
    ids = tokenizer.apply_chat_template(as_dict, tools=TOOLS, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding here
        ids = ids["input_ids"]
    assert ids.count(tiny_token_ids()["<tool_call>"]) >= 3


# ---- checkpoints -----------------------------------------------------------------------------


def load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def tensor_names(path: Path) -> set:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_loads_and_generates(arch: str, tie: bool) -> None:
    path = tiny_model_dir(arch, tie=tie)
    config = json.loads((path / "config.json").read_text())
    ids = tiny_token_ids()
    assert config["vocab_size"] == ids["vocab_size"] and config["head_dim"] == 16
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is tie
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"
    assert config["eos_token_id"] == ids[IM_END]
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ids[IM_END], ids[ENDOFTEXT]]
    assert not {"temperature", "top_p", "top_k", "do_sample"} & set(generation)

    names = tensor_names(path)
    assert ("lm_head.weight" in names) is not tie
    assert ("model.layers.0.self_attn.q_proj.bias" in names) is (arch == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) is (arch == "qwen3")

    model = load(path)
    assert model.dtype == torch.float32
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompt = tokenizer("The weather in Paris is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=ids[ENDOFTEXT])
    assert out.sequences.shape[1] > prompt.shape[1]
    # Greedy decisions must not hinge on float32 rounding: the top-2 gap is typically large.
    top2 = torch.topk(torch.stack(out.scores).float(), 2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).flatten()
    assert gaps.median() > 0.1 and gaps.min() > 1e-4


def test_checkpoint_is_deterministic_and_overridable(tmp_path: Path) -> None:
    a = build_tiny_checkpoint(tmp_path / "a", arch="llama", seed=3, num_hidden_layers=3)
    b = build_tiny_checkpoint(tmp_path / "b", arch="llama", seed=3, num_hidden_layers=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert json.loads((a / "config.json").read_text())["num_hidden_layers"] == 3
    c = build_tiny_checkpoint(tmp_path / "c", arch="llama", seed=4, num_hidden_layers=3)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="unknown arch"):
        build_tiny_checkpoint(tmp_path / "d", arch="gpt2")


def test_sharded_checkpoint(tmp_path: Path) -> None:
    sharded = build_tiny_checkpoint(tmp_path / "sharded", arch="qwen2", tie_word_embeddings=False,
                                    shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((sharded / s).exists() for s in shards)
    assert not (sharded / "model.safetensors").exists()
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = load(tiny_model_dir("qwen2", tie=False))(prompt).logits
        torch.testing.assert_close(load(sharded)(prompt).logits, expected)


def test_tiny_model_dir_is_cached() -> None:
    first = tiny_model_dir("qwen3")
    assert tiny_model_dir("qwen3") == first and tiny_model_dir(arch="qwen3", tie=True) == first
    other = tiny_model_dir("qwen3", num_hidden_layers=3)
    assert other != first and json.loads((other / "config.json").read_text())["num_hidden_layers"] == 3
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (first / name).is_file()

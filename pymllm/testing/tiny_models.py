"""Tiny random checkpoints and a tiny Qwen-style tokenizer, built locally for tests.

Nothing here downloads: the tokenizer is trained in well under a second on an embedded corpus,
and the models are transformers config classes filled with seeded random weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# Qwen3 marks these as added but not special: they are single tokens, yet survive
# skip_special_tokens so reasoning and tool-call parsers can see them in decoded text.
MARKUP_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
BPE_VOCAB_SIZE = 1400

# Plain text, code and tool-call JSON so that typical test strings take few tokens. The emoji
# U+1F642 is left out on purpose: "héllo 你好 🙂" then ends in tokens that each hold part of
# one character, which is what incremental UTF-8 detokenization must cope with.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
The weather in Paris is sunny with a high of 24 degrees and a low of 15 degrees.
In London it is raining, and the temperature is 12 degrees Celsius, or about 54 degrees Fahrenheit.
Please write a short poem about the sea. The sea is wide, the sea is deep, its waves roll in while sailors sleep.
The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome.
Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees.
One, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14159 -42 0.5 1e-6
The answer is 42. The total cost was $19.99, plus 8% tax, for a final price of $21.59.
Let me think step by step. First, we add 17 and 25 to get 42. Then we divide by 2 to get 21.
Okay, so the user wants to know the weather. I should call the weather tool with the city name.
I need to find the current time in Tokyo. Tokyo is 9 hours ahead of UTC.
Sure! Here is a list: apples, bananas, cherries, dates, and elderberries.
Question: What is 7 times 8? Answer: 7 times 8 is 56.
Question: Who wrote the play Hamlet? Answer: William Shakespeare wrote Hamlet around 1600.
She said, "It's a beautiful day." He replied, 'Yes, it is; let's go for a walk.'
Punctuation matters: commas, periods. Colons: semicolons; dashes - and underscores _ (parentheses) [brackets] {braces}.
Symbols like @ # % ^ & * + = < > / \\ | ~ ` are used in code and math.
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)

if x > 0 and y < 10:
    result = x + y
else:
    result = None

class Point:
    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"name": "get_time", "arguments": {"timezone": "Asia/Tokyo"}}
{"name": "search", "arguments": {"query": "best pizza in New York", "limit": 5}}
{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
{"temperature": 22, "condition": "sunny", "humidity": 0.45, "wind_kph": 10.5, "ok": true, "error": null}
[1, 2, 3, 4, 5] {"a": 1, "b": [true, false, null], "c": {"d": "e"}}
The model generates one token at a time. Each new token depends on the tokens before it.
A large language model is trained on a large amount of text. It predicts the next word.
The server receives a request, schedules it in a batch, runs the model, and streams the output back.
Streaming means the client sees each piece of text as soon as it is ready.
Caching the keys and values of earlier tokens makes decoding much faster.
The cat sat on the mat. The dog sat on the log. The bird sat in the tree and sang a song.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
January, February, March, April, May, June, July, August, September, October, November, December.
Red, orange, yellow, green, blue, indigo, and violet are the colors of the rainbow.
The meeting is at 3:30 PM on 2024-05-17 in room 204. Please bring your laptop.
Error: file not found. Warning: low memory. Info: done in 0.25 seconds.
Thank you for your help! You're welcome. Have a great day. Goodbye!
Unicode text: héllo wörld, café, naïve, façade, über, señor, crème brûlée.
Chinese: 你好，世界。今天天气很好。我们去公园吧。谢谢你！
Japanese: こんにちは、元気ですか。ありがとうございます。
Korean: 안녕하세요. Russian: Привет, как дела? Greek: Γειά σου κόσμε. Arabic: مرحبا بالعالم
Emoji: 😀 🎉 👍 ❤️ 🚀 🌍 🍕 ☕ ✨
Math: α + β = γ, π ≈ 3.14, x² + y² = z², ∑ of n from 1 to ∞, √2 ≈ 1.414, 5 ≤ 6 ≥ 4 ≠ 3.
"""

# Written for this project in the Qwen3 layout. Literal text is emitted through {{ '...' }} so
# that whitespace control never eats a newline the format needs.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if has_system -%}{{- text(messages[0].content) + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to help with the request.\\n\\n"
    "The available functions are described by these JSON schemas, inside <tools></tools>:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nTo call a function, answer with a JSON object holding its name and arguments "
    "inside <tool_call></tool_call> tags, one block per call:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif has_system -%}"
    "{{- '<|im_start|>system\\n' + text(messages[0].content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- set content = text(m.content) -%}"
    "{%- if m.role == 'system' -%}"
    "{%- if not loop.first -%}{{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- elif m.role == 'user' -%}"
    "{{- '<|im_start|>user\\n' + content + '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is defined and m.reasoning_content else '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    # Reasoning is kept only for the turns after the last user message, as Qwen3 does.
    "{%- if reasoning and loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{{- content -}}"
    "{%- if m.tool_calls is defined and m.tool_calls -%}"
    "{%- for call in m.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' -}}"
    "{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    # Consecutive tool results share one user turn.
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        # Every byte gets a token, so any UTF-8 text encodes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Added after training so they sit at the end of the vocabulary, as in Qwen's tokenizers.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tok.to_str()


def build_tiny_tokenizer(out_dir: Union[str, Path]) -> Path:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into out_dir."""
    from tokenizers import Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_json = _trained_tokenizer_json()
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    tok = Tokenizer.from_str(tok_json)
    added = {}
    for token in SPECIAL_TOKENS + MARKUP_TOKENS:
        added[str(tok.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": token in SPECIAL_TOKENS,
        }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    text = json.dumps(config, indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(text, encoding="utf-8")
    return out


def tiny_token_ids() -> Dict[str, int]:
    """Ids of the special and markup tokens, plus "vocab_size" (all tokens, added ones included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


_ARCHS = {"qwen3": "Qwen3Config", "llama": "LlamaConfig", "qwen2": "Qwen2Config"}


def _make_config(arch: str, tie_word_embeddings: bool, overrides: Dict[str, Any]) -> Any:
    import transformers

    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_ARCHS)}")
    ids = tiny_token_ids()
    kwargs: Dict[str, Any] = dict(
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    if arch == "llama":
        kwargs.update(attention_bias=False, mlp_bias=False)
    kwargs.update(overrides)
    return getattr(transformers, _ARCHS[arch])(**kwargs)


# Gain of the final norm: it scales the logits to a std of about 5 so that greedy top-2 gaps
# sit far above float32 noise. A larger embedding std would do that too, but with tied
# embeddings it lets the input token dominate the residual stream and the model just repeats.
_FINAL_NORM_GAIN = 4.0


def _init_weights(model: Any, seed: int, std: float) -> None:
    """Seeded init by parameter name, so the weights do not depend on transformers' own init."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                # Norm gains near 1 but not 1, so a loader that skips them changes the output.
                gain = _FINAL_NORM_GAIN if name == "model.norm.weight" else 1.0
                param.copy_(gain * (1.0 + 0.1 * noise))
            else:
                # Biases are random too, for the same reason (Qwen2's q/k/v bias).
                param.copy_(std * noise)


def build_tiny_checkpoint(
    out_dir: Union[str, Path],
    arch: str = "qwen3",
    tie_word_embeddings: bool = True,
    seed: int = 0,
    std: float = 0.15,
    shard_size: Optional[Union[int, str]] = None,
    **overrides: Any,
) -> Path:
    """Save a tiny random float32 model (safetensors) with the tiny tokenizer into out_dir.

    ``overrides`` go to the transformers config class (e.g. ``num_hidden_layers=3``).
    ``shard_size`` (e.g. ``"100KB"``) saves a sharded checkpoint with an index file.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _make_config(arch, tie_word_embeddings, overrides)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    _init_weights(model, seed, std)
    save_kwargs: Dict[str, Any] = {}
    if shard_size is not None:
        save_kwargs["max_shard_size"] = shard_size
    model.save_pretrained(out, **save_kwargs)
    _add_legacy_config_keys(out / "config.json")

    _write_generation_config(out, tiny_token_ids())
    build_tiny_tokenizer(out)
    return out


def _write_generation_config(out: Path, ids: Dict[str, int]) -> None:
    """The chat checkpoints' end tokens: <|im_end|> and <|endoftext|> stop, the latter pads."""
    generation = {
        "bos_token_id": ids[ENDOFTEXT],
        "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "pad_token_id": ids[ENDOFTEXT],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")


def _add_legacy_config_keys(path: Path) -> None:
    """Also write the pre-5.0 keys (rope_theta, torch_dtype) that published checkpoints carry,
    so loaders written against either transformers generation read the same values."""
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    config.setdefault("rope_scaling", None)
    config.setdefault("torch_dtype", config.get("dtype") or "float32")
    path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _cache_key(arch: str, tie: bool, kw: Dict[str, Any]) -> str:
    import transformers

    # The module source is part of the key so an edited builder never reuses a stale cache.
    source = Path(__file__).read_bytes()
    payload = json.dumps([arch, tie, sorted(kw.items()), transformers.__version__], default=str)
    digest = hashlib.sha256(source + payload.encode()).hexdigest()[:16]
    return f"{arch}-{'tied' if tie else 'untied'}-{digest}"


@functools.lru_cache(maxsize=None)
def _cached_dir(arch: str, tie: bool, frozen_kw: tuple) -> Path:
    """Build (arch "qwen3_vl": the VL checkpoint) into the shared temp dir once, atomically."""
    kw = dict(frozen_kw)
    root = Path(tempfile.gettempdir()) / "pymllm-tiny"
    final = root / _cache_key(arch, tie, kw)
    if (final / "config.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
    try:
        if arch == "qwen3_vl":
            build_tiny_vl_checkpoint(staging, tie_word_embeddings=tie, **kw)
        else:
            build_tiny_checkpoint(staging, arch=arch, tie_word_embeddings=tie, **kw)
        try:
            os.rename(staging, final)  # atomic: readers see a complete directory or none
        except OSError:
            if not (final / "config.json").exists():
                raise  # not a lost race with another builder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def tiny_model_dir(arch: str = "qwen3", tie: bool = True, **kw: Any) -> Path:
    """Path of a cached tiny checkpoint for these arguments, built on first use.

    Shared across processes through the temp dir; treat the directory as read-only.
    """
    return _cached_dir(arch, tie, tuple(sorted(kw.items())))


# ---------------------------------------------------------------- Qwen3-VL
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# The text template with image parts rendered the way Qwen-VL templates do.
CHAT_TEMPLATE_VL = CHAT_TEMPLATE.replace(
    "{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}",
    "{%- if part.type == 'text' -%}{{- part.text -}}"
    "{%- elif part.type == 'image_url' or part.type == 'image' -%}"
    "{{- '" + VISION_START + IMAGE_PAD + VISION_END + "' -}}{%- endif -%}",
)
assert CHAT_TEMPLATE_VL != CHAT_TEMPLATE


@functools.lru_cache(maxsize=1)
def _vl_tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    return tok.to_str()


def tiny_vl_token_ids() -> Dict[str, int]:
    """Ids of the tiny VL tokenizer's special tokens, plus "vocab_size"."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(_vl_tokenizer_json())
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS + VISION_TOKENS}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def build_tiny_vl_tokenizer(out_dir: Union[str, Path]) -> Path:
    """The tiny tokenizer plus the vision special tokens and an image-aware chat template."""
    out = build_tiny_tokenizer(out_dir)
    tok_json = _vl_tokenizer_json()
    (out / "tokenizer.json").write_text(tok_json, encoding="utf-8")
    ids = tiny_vl_token_ids()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for token in VISION_TOKENS:
        config["added_tokens_decoder"][str(ids[token])] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
    config["chat_template"] = CHAT_TEMPLATE_VL
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


# Processor geometry of the tiny model: 4x4 patches, 2x2 merge (one token per 8x8 pixels),
# at most 48x48 pixels (36 tokens) per image.
TINY_VL_PATCH = 4
TINY_VL_MAX_PIXELS = 48 * 48
TINY_VL_MIN_PIXELS = 8 * 8


def _make_vl_config(tie_word_embeddings: bool, overrides: Dict[str, Any]) -> Any:
    from transformers import Qwen3VLConfig

    ids = tiny_vl_token_ids()
    text = dict(
        vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
        # Sections of head_dim / 2 = 16 frequencies: 6 temporal, 5 height, 5 width (interleaved).
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [6, 5, 5], "mrope_interleaved": True},
    )
    text.update(overrides.pop("text_config", {}))
    vision = dict(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
        patch_size=TINY_VL_PATCH, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=text["hidden_size"],
        num_position_embeddings=64, deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh",
    )
    vision.update(overrides.pop("vision_config", {}))
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=tie_word_embeddings, **overrides,
    )


def _init_vl_weights(model: Any, seed: int, std: float) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
            if "norm" in leaf and name.endswith(".weight"):
                gain = _FINAL_NORM_GAIN if name == "model.language_model.norm.weight" else 1.0
                param.copy_(gain * (1.0 + 0.1 * noise))
            else:
                param.copy_(std * noise)


def build_tiny_vl_checkpoint(
    out_dir: Union[str, Path], tie_word_embeddings: bool = False, seed: int = 0, std: float = 0.15, **overrides: Any
) -> Path:
    """A tiny random Qwen3-VL (float32 safetensors, DeepStack on), its image processor config
    and the tiny tokenizer with the vision tokens, saved into out_dir."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _make_vl_config(tie_word_embeddings, dict(overrides))
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32)
    _init_vl_weights(model, seed, std)
    model.save_pretrained(out)
    processor = Qwen2VLImageProcessorPil(
        patch_size=TINY_VL_PATCH, temporal_patch_size=2, merge_size=2,
        min_pixels=TINY_VL_MIN_PIXELS, max_pixels=TINY_VL_MAX_PIXELS,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(out)
    _write_generation_config(out, tiny_vl_token_ids())
    build_tiny_vl_tokenizer(out)
    return out


def tiny_vl_model_dir(tie: bool = False, **kw: Any) -> Path:
    """Path of a cached tiny Qwen3-VL checkpoint (built on first use; treat as read-only)."""
    return _cached_dir("qwen3_vl", tie, tuple(sorted(kw.items())))

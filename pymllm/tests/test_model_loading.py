"""Checkpoint loading: sharded safetensors, dummy weights, clear errors; the flags that steer it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from pymllm.configs import ConfigError, GlobalConfig
from pymllm.configs.model_config import load_model_config
from pymllm.executor import model_runner as model_runner_module
from pymllm.executor.model_runner import ModelRunner, resolve_device
from pymllm.model_loader.loader import load_model
from pymllm.testing.tiny_models import build_tiny_checkpoint, tiny_model_dir
from pymllm.tests.helpers import greedy, make_scheduler, run_requests

PROMPT = [5, 17, 300, 42, 7, 99]


def _server(model_dir, **kw) -> GlobalConfig:
    config = GlobalConfig()
    config.server.model_path = str(model_dir)
    config.server.device = "cpu"
    for key, value in kw.items():
        setattr(config.server, key, value)
    config.validate()
    return config


def _load(config: GlobalConfig):
    mc = load_model_config(config.server, torch.device("cpu"))
    return mc, load_model(mc, config.server.load_format, torch.device("cpu"), seed=config.server.random_seed)


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    sharded = build_tiny_checkpoint(tmp_path / "sharded", arch="qwen3", shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    sched = make_scheduler(sharded, max_total_tokens=256)
    out = run_requests(sched, [PROMPT], [greedy(6, ignore_eos=True)])["0"].output_ids
    ref = AutoModelForCausalLM.from_pretrained(sharded, torch_dtype=torch.float32)
    expected = ref.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    assert out == expected


def test_missing_shard_and_missing_weights_fail_clearly(tmp_path):
    sharded = build_tiny_checkpoint(tmp_path / "m", arch="llama", shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (sharded / victim).unlink()
    with pytest.raises(ConfigError, match="missing"):
        _load(_server(sharded))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(sharded / "config.json", empty / "config.json")
    with pytest.raises(ConfigError, match="no \\*.safetensors"):
        _load(_server(empty))


def test_unknown_architecture_and_missing_config(tmp_path):
    model = tmp_path / "odd"
    shutil.copytree(tiny_model_dir("qwen3"), model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model architecture.*MambaForCausalLM"):
        _load(_server(model))
    with pytest.raises(ConfigError, match="--server.model_path.*config.json"):
        _load(_server(tmp_path))
    with pytest.raises(ConfigError, match="--server.model_path.*not a directory"):
        _load(_server(tmp_path / "nowhere"))


def test_dummy_weights_from_config_alone_follow_random_seed(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model_dir("qwen3") / "config.json", bare / "config.json")
    _, a = _load(_server(bare, load_format="dummy", random_seed=1))
    _, b = _load(_server(bare, load_format="dummy", random_seed=1))
    _, c = _load(_server(bare, load_format="dummy", random_seed=2))
    wa, wb, wc = (m.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tokenizer_path_and_dtype(tmp_path):
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    src = tiny_model_dir("qwen3")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(src / name, weights_only / name)
    mc = load_model_config(_server(weights_only, tokenizer_path=str(src)).server, torch.device("cpu"))
    assert mc.tokenizer_path == str(src)
    with pytest.raises(ConfigError, match="--server.tokenizer_path"):
        load_model_config(_server(weights_only, tokenizer_path=str(tmp_path / "none")).server, torch.device("cpu"))
    mc = load_model_config(_server(src, dtype="bfloat16").server, torch.device("cpu"))
    assert mc.dtype == torch.bfloat16
    assert load_model_config(_server(src).server, torch.device("cpu")).dtype == torch.float32


def test_device_flag_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match="--server.device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_kv_capacity_from_mem_fraction_static(monkeypatch):
    config = _server(tiny_model_dir("qwen3"), mem_fraction_static=0.5)
    mc = load_model_config(config.server, torch.device("cpu"))
    runner = ModelRunner(config, mc, torch.device("cuda"))  # only the sizing arithmetic runs
    gib = 2**30
    monkeypatch.setattr(model_runner_module, "device_memory", lambda device: (30 * gib, 40 * gib))
    per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 4
    # Budget: free memory minus what the other (1 - fraction) of the device must keep.
    assert runner._kv_capacity() == int((30 * gib - 40 * gib * 0.5) // per_token)
    runner.server.mem_fraction_static = 0.2
    with pytest.raises(ConfigError, match="--server.mem_fraction_static"):
        runner._kv_capacity()
    runner.server.max_total_tokens = 1000
    assert runner._kv_capacity() == 1000

"""The CLI is generated from the dataclass configs; bad values name their flag."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pymllm.__main__ import main as pymllm_main
from pymllm.configs import ConfigError, parse_config


def test_flags_map_to_fields():
    cfg = parse_config([
        "--server.model_path", "/m", "--server.dtype", "bfloat16", "--server.load_format", "dummy",
        "--server.max_running_requests", "3", "--server.max_total_tokens", "256",
        "--server.max_prefill_tokens", "128", "--server.mem_fraction_static", "0.05",
        "--server.context_length", "512", "--server.random_seed", "7", "--server.log_level", "debug",
        "--server.attention_backend", "torch_native", "--server.port", "31000",
    ])
    s = cfg.server
    assert (s.model_path, s.dtype, s.load_format) == ("/m", "bfloat16", "dummy")
    assert (s.max_running_requests, s.max_total_tokens, s.max_prefill_tokens) == (3, 256, 128)
    assert (s.mem_fraction_static, s.context_length, s.random_seed) == (0.05, 512, 7)
    assert (s.log_level, s.attention_backend, s.port) == ("debug", "torch_native", 31000)


def test_tokenizer_path_defaults_to_model_path():
    cfg = parse_config(["--server.model_path", "/m"])
    assert cfg.server.effective_tokenizer_path == "/m"
    cfg = parse_config(["--server.model_path", "/m", "--server.tokenizer_path", "/t"])
    assert cfg.server.effective_tokenizer_path == "/t"


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--server.dtype", "int3"], "--server.dtype"),
        (["--server.load_format", "pickle"], "--server.load_format"),
        (["--server.max_running_requests", "0"], "--server.max_running_requests"),
        (["--server.max_running_requests", "many"], "--server.max_running_requests"),
        (["--server.mem_fraction_static", "1.5"], "--server.mem_fraction_static"),
        (["--server.max_total_tokens", "-1"], "--server.max_total_tokens"),
        (["--server.attention_backend", "xformers"], "--server.attention_backend"),
        (["--server.port", "70000"], "--server.port"),
        (["--server.log_level", "loud"], "--server.log_level"),
    ],
)
def test_invalid_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        parse_config(argv)


def test_unknown_flag_is_rejected():
    with pytest.raises(ConfigError, match="--server.no_such_flag"):
        parse_config(["--server.no_such_flag", "1"])


def test_show_config_prints_resolved_config(capsys):
    assert pymllm_main(["show-config", "--server.model_path", "/m", "--server.dtype", "float16"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["server"]["dtype"] == "float16"
    assert resolved["server"]["tokenizer_path"] == "/m"


def test_show_config_rejects_bad_value(capsys):
    assert pymllm_main(["show-config", "--server.dtype", "fp8"]) == 2
    assert "--server.dtype" in capsys.readouterr().err


def test_show_env_cli():
    out = subprocess.run(
        [sys.executable, "-m", "pymllm", "show-env"], capture_output=True, text=True, check=True
    ).stdout
    env = json.loads(out)
    assert env["torch"] != "not installed"
    assert "cuda_available" in env and "devices" in env

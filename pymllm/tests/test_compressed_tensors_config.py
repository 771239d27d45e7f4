"""compressed-tensors config parsing, per-layer decisions, ignore matching and rejections."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from pymllm.configs import ConfigError, parse_config
from pymllm.configs import quantization_config as cli_quantization
from pymllm.models.llama import LlamaForCausalLM
from pymllm.quantization import QUANTIZATION_METHODS, get_quantization_config
from pymllm.quantization.compressed_tensors import CompressedTensorsConfig
from pymllm.quantization.compressed_tensors.schemes import W8A8Int8Scheme, WNA16Scheme

W8A8 = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "sparsity_config": {},
    "transform_config": {},
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "format": "int-quantized",
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                        "group_size": None, "dynamic": False, "actorder": None},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "group_size": None, "dynamic": True},
            "output_activations": None,
        }
    },
}

W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "format": "pack-quantized",
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": 128, "dynamic": False, "actorder": None},
            "input_activations": None,
            "output_activations": None,
        }
    },
}

QKV = "model.layers.0.self_attn.qkv_proj"
O_PROJ = "model.layers.0.self_attn.o_proj"
GATE_UP = "model.layers.0.mlp.gate_up_proj"
DOWN = "model.layers.0.mlp.down_proj"


def make(raw: dict, **changes) -> CompressedTensorsConfig:
    raw = copy.deepcopy(raw)
    raw.update(changes)
    config = CompressedTensorsConfig.from_config(raw)
    config.set_packed_modules(LlamaForCausalLM.stacked_params_mapping)
    return config


def with_group(raw: dict, **group_changes) -> dict:
    raw = copy.deepcopy(raw)
    group = raw["config_groups"]["group_0"]
    for path, value in group_changes.items():
        section, _, key = path.partition("__")
        if key:
            group[section][key] = value
        else:
            group[section] = value
    return raw


def scheme_of(config: CompressedTensorsConfig, prefix: str):
    method = config.get_linear_method(prefix)
    return None if method is None else method.scheme


def test_packed_modules_come_from_the_model_mapping():
    config = make(W8A8)
    assert config.packed_modules == {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    assert config.checkpoint_names(QKV) == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert config.checkpoint_names(O_PROJ) == [O_PROJ]


@pytest.mark.parametrize("prefix", [QKV, O_PROJ, GATE_UP, DOWN])
def test_w8a8_every_linear(prefix):
    assert isinstance(scheme_of(make(W8A8), prefix), W8A8Int8Scheme)


@pytest.mark.parametrize(
    "weights, group, symmetric",
    [
        ({"group_size": 128}, 128, True),
        ({"group_size": 32}, 32, True),
        ({"group_size": 64, "symmetric": False}, 64, False),
        ({"strategy": "channel", "group_size": None}, None, True),
    ],
)
def test_w4a16_variants(weights, group, symmetric):
    raw = with_group(W4A16, **{f"weights__{k}": v for k, v in weights.items()})
    scheme = scheme_of(make(raw), DOWN)
    assert isinstance(scheme, WNA16Scheme)
    assert (scheme.group_size, scheme.symmetric) == (group, symmetric)


def test_ignore_exact_name_only_hits_that_module():
    config = make(W8A8, ignore=["lm_head", DOWN])
    assert scheme_of(config, DOWN) is None
    assert scheme_of(config, "model.layers.1.mlp.down_proj") is not None


def test_ignore_prefix_covers_children():
    config = make(W8A8, ignore=["model.layers.1"])
    assert scheme_of(config, "model.layers.1.self_attn.qkv_proj") is None
    assert scheme_of(config, "model.layers.1.mlp.down_proj") is None
    assert scheme_of(config, "model.layers.10.mlp.down_proj") is not None  # a prefix ends at a dot
    assert scheme_of(config, QKV) is not None


def test_ignore_regex_on_all_shards_keeps_fused_layer_float():
    config = make(W8A8, ignore=["re:.*self_attn\\.[qkv]_proj$"])
    assert scheme_of(config, QKV) is None
    assert scheme_of(config, O_PROJ) is not None


def test_ignore_of_some_shards_is_rejected_with_layer_name():
    config = make(W8A8, ignore=["re:.*gate_proj$"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_up_proj.*gate_proj"):
        config.get_linear_method(GATE_UP)


def test_regex_and_exact_targets():
    raw = with_group(W8A8, targets=["re:.*mlp\\..*", "model.layers.0.self_attn.o_proj"])
    config = make(raw)
    assert scheme_of(config, QKV) is None  # not targeted: stays float
    assert scheme_of(config, O_PROJ) is not None
    assert scheme_of(config, GATE_UP) is not None


def test_shards_in_different_groups_are_rejected():
    raw = copy.deepcopy(W8A8)
    raw["config_groups"]["group_0"]["targets"] = ["re:.*q_proj$", "re:.*mlp.*"]
    raw["config_groups"]["group_1"] = with_group(W4A16, targets=["re:.*[kv]_proj$"])["config_groups"]["group_0"]
    with pytest.raises(ValueError, match=r"qkv_proj: the shards of this fused layer use different config groups"):
        make(raw).get_linear_method(QKV)


def test_exact_name_beats_class_target():
    raw = copy.deepcopy(W4A16)
    raw["config_groups"]["group_1"] = with_group(W8A8, targets=[DOWN])["config_groups"]["group_0"]
    config = make(raw)
    assert isinstance(scheme_of(config, DOWN), W8A8Int8Scheme)
    assert isinstance(scheme_of(config, "model.layers.1.mlp.down_proj"), WNA16Scheme)


@pytest.mark.parametrize(
    "base, changes, field",
    [
        (W8A8, {"weights__num_bits": 4}, "weights.num_bits"),
        (W8A8, {"weights__strategy": "tensor"}, "weights.strategy"),
        (W8A8, {"input_activations__dynamic": False}, "input_activations.dynamic"),
        (W8A8, {"input_activations__strategy": "tensor"}, "input_activations.strategy"),
        (W8A8, {"input_activations__symmetric": False}, "input_activations.symmetric"),
        (W8A8, {"input_activations__type": "float"}, "input_activations.type"),
        (W8A8, {"weights__type": "float"}, "weights.type"),
        (W4A16, {"weights__num_bits": 3}, "weights.num_bits"),
        (W4A16, {"weights__group_size": 256}, "weights.group_size"),
        (W4A16, {"weights__strategy": "tensor"}, "weights.strategy"),
        (W4A16, {"weights__actorder": "group"}, "weights.actorder"),
        (W4A16, {"weights__block_structure": [128, 128]}, "weights.block_structure"),
        (W4A16, {"format": "marlin-24"}, "format"),
        (W4A16, {"output_activations": {"num_bits": 8}}, "output_activations"),
        (W4A16, {"weights": None}, "weights"),
    ],
)
def test_unsupported_signature_names_layer_and_field(base, changes, field):
    config = make(with_group(base, **changes))
    with pytest.raises(ValueError) as info:
        config.get_linear_method(DOWN)
    message = str(info.value)
    assert message.startswith(DOWN) and field in message


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"kv_cache_scheme": {"num_bits": 8}}, "kv_cache_scheme"),
        ({"sparsity_config": {"format": "sparse-24"}}, "sparsity_config"),
        ({"transform_config": {"config_groups": {"u": {}}}}, "transform_config"),
        ({"quantization_status": "initialized"}, "quantization_status"),
        ({"config_groups": {}}, "config_groups"),
    ],
)
def test_unsupported_global_fields(changes, field):
    with pytest.raises(ValueError, match=field):
        make(W8A8, **changes)


def test_config_dumped_by_the_library_parses():
    ct = pytest.importorskip("compressed_tensors.quantization")
    presets = (
        ("W8A8", "int-quantized", W8A8Int8Scheme),
        ("W4A16", "pack-quantized", WNA16Scheme),
        ("W4A16_ASYM", "pack-quantized", WNA16Scheme),
    )
    for preset, fmt, scheme_type in presets:
        scheme = ct.preset_name_to_scheme(preset, ["Linear"])
        dumped = ct.QuantizationConfig(
            config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="compressed", format=fmt
        ).model_dump()
        dumped["quant_method"] = "compressed-tensors"
        assert isinstance(scheme_of(make(dumped), QKV), scheme_type), preset


def hf(quantization_config=None):
    return SimpleNamespace(quantization_config=quantization_config) if quantization_config else SimpleNamespace()


def test_method_detected_from_checkpoint():
    assert isinstance(get_quantization_config(None, hf(W8A8)), CompressedTensorsConfig)
    assert get_quantization_config(None, hf()) is None


def test_method_flag_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--quantization.method compressed-tensors: config.json has no"):
        get_quantization_config("compressed-tensors", hf())
    with pytest.raises(ConfigError, match="--quantization.method: the checkpoint is quantized with 'gptq'"):
        get_quantization_config(None, hf({"quant_method": "gptq"}))
    with pytest.raises(ConfigError, match="the checkpoint is quantized with 'awq'"):
        get_quantization_config("compressed-tensors", hf({"quant_method": "awq"}))
    with pytest.raises(ConfigError, match="kv_cache_scheme"):
        get_quantization_config("compressed-tensors", hf({**W8A8, "kv_cache_scheme": {"num_bits": 8}}))


def test_cli_flag():
    assert parse_config([]).quantization.method is None
    config = parse_config(["--quantization.method", "compressed-tensors"])
    assert config.quantization.method == "compressed-tensors"
    with pytest.raises(ConfigError, match="--quantization.method: 'gguf' is not one of compressed-tensors"):
        parse_config(["--quantization.method", "gguf"])


def test_cli_choices_match_implemented_methods():
    assert tuple(QUANTIZATION_METHODS) == cli_quantization.QUANTIZATION_METHODS


def test_qwen3_vl_vision_tower_stays_float_under_quantized_checkpoints():
    """A quantized Qwen3-VL checkpoint quantizes the text decoder's linears only: the vision
    tower (patch embed, blocks, mergers) and the LM head keep float weights, whatever the
    config's targets say (compressed-tensors' "Linear" target would match them all)."""
    from transformers import AutoConfig

    from pymllm.layers.linear import LinearBase, UnquantizedLinearMethod
    from pymllm.models.qwen3_vl import Qwen3VLForConditionalGeneration
    from pymllm.testing.tiny_models import tiny_vl_model_dir

    hf_config = AutoConfig.from_pretrained(tiny_vl_model_dir())
    for raw, scheme in ((W8A8, W8A8Int8Scheme), (with_group(W4A16, weights__group_size=32), WNA16Scheme)):
        quant = CompressedTensorsConfig.from_config(copy.deepcopy(raw))
        quant.set_packed_modules(Qwen3VLForConditionalGeneration.stacked_params_mapping)
        model = Qwen3VLForConditionalGeneration(hf_config, quant_config=quant)
        linears = {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}
        vision = {n: m for n, m in linears.items() if ".visual." in f".{n}."}
        text = {n: m for n, m in linears.items() if n not in vision}
        assert vision and text
        for name, module in vision.items():
            assert isinstance(module.quant_method, UnquantizedLinearMethod), name
            assert module.weight.dtype.is_floating_point, name
        for name, module in text.items():
            assert isinstance(getattr(module.quant_method, "scheme", None), scheme), name
        assert not isinstance(model.lm_head, LinearBase)  # a plain float matrix

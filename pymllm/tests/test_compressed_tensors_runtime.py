"""compressed-tensors at runtime: parameters, the post-load layout conversion, the forward of each
scheme against a dequantized float reference, and whole tiny Qwen3 checkpoints quantized by the
compressed-tensors library itself compared with transformers' decompressed model.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from pymllm.configs import GlobalConfig
from pymllm.engine.forward_batch import ForwardMode
from pymllm.layers.linear import Linear, QKVLinear
from pymllm.models.llama import LlamaForCausalLM
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.orchestrator.scheduler_process import build_scheduler
from pymllm.quantization.compressed_tensors import CompressedTensorsConfig
from pymllm.quantization.kernels.int8_activation_triton import per_token_quant_int8_reference
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy, make_scheduler, run_requests
from pymllm.tests.test_compressed_tensors_config import W4A16, W8A8, with_group


def config_for(raw: dict) -> CompressedTensorsConfig:
    config = CompressedTensorsConfig.from_config(raw)
    config.set_packed_modules(LlamaForCausalLM.stacked_params_mapping)
    return config


def qkv_layer(raw: dict, bias: bool = False, dtype: torch.dtype = torch.float32) -> QKVLinear:
    # hidden 256, q 4 x 32 = 128 rows, k and v 2 x 32 = 64 rows each.
    return QKVLinear(256, 32, 4, 2, bias=bias, quant_config=config_for(raw),
                     prefix="model.layers.0.self_attn.qkv_proj", params_dtype=dtype)


SHARDS = {"q": 128, "k": 64, "v": 64}


# ---------------------------------------------------------------- W8A8
def test_w8a8_parameters():
    layer = qkv_layer(W8A8)
    params = dict(layer.named_parameters())
    assert set(params) == {"weight", "weight_scale"}
    assert (params["weight"].shape, params["weight"].dtype) == ((256, 256), torch.int8)
    assert (params["weight_scale"].shape, params["weight_scale"].dtype) == ((256, 1), torch.float32)
    assert params["weight"].output_dim == 0 and params["weight_scale"].output_dim == 0


def load_w8a8(layer: QKVLinear, seed: int = 0) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights, scales = [], []
    for shard, rows in SHARDS.items():
        w = torch.randint(-127, 128, (rows, 256), generator=gen, dtype=torch.int8)
        s = torch.rand(rows, 1, generator=gen) * 0.01 + 0.001
        layer.weight_loader(layer.weight, w, shard)
        layer.weight_loader(layer.weight_scale, s, shard)
        weights.append(w)
        scales.append(s)
    return {"weight": torch.cat(weights), "scale": torch.cat(scales)}


def test_w8a8_post_load_is_a_view_and_forward_matches_reference():
    layer = qkv_layer(W8A8, bias=True)
    loaded = load_w8a8(layer)
    layer.bias.data.normal_()
    storage = layer.weight.data_ptr()
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.shape == (256, 256) and layer.weight.stride() == (1, 256)  # column-major [K, N]
    assert layer.weight.data_ptr() == storage and torch.equal(layer.weight.t(), loaded["weight"])
    assert layer.weight_scale.shape == (256,) and layer.weight_scale.dtype == torch.float32
    x = torch.randn(2, 5, 256)
    q, s = per_token_quant_int8_reference(x.reshape(-1, 256))
    w = loaded["weight"].double() * loaded["scale"].double()
    expected = (q.double() * s.double()) @ w.t() + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected.reshape(2, 5, 256), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- W4A16
W4A16_VARIANTS = {
    "g128": with_group(W4A16),
    "g32": with_group(W4A16, weights__group_size=32),
    "g64-asym": with_group(W4A16, weights__group_size=64, weights__symmetric=False),
    "channel": with_group(W4A16, weights__strategy="channel", weights__group_size=None),
}


@pytest.mark.parametrize("name", W4A16_VARIANTS)
def test_w4a16_parameters(name):
    layer = qkv_layer(W4A16_VARIANTS[name], dtype=torch.float16)
    groups = {"g128": 2, "g32": 8, "g64-asym": 4, "channel": 1}[name]
    params = {k: (tuple(v.shape), v.dtype) for k, v in layer.named_parameters()}
    expected = {
        "weight_packed": ((256, 32), torch.int32),
        "weight_scale": ((256, groups), torch.float16),
        "weight_shape": ((2,), torch.int64),
    }
    if name == "g64-asym":
        expected["weight_zero_point"] = ((32, groups), torch.int32)
        assert layer.weight_zero_point.output_pack_factor == 8
    assert params == expected


@pytest.mark.parametrize("name", W4A16_VARIANTS)
def test_w4a16_post_load_layout_and_forward(name):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    raw = W4A16_VARIANTS[name]
    layer = qkv_layer(raw)
    group = layer.quant_method.scheme.group
    symmetric = layer.quant_method.scheme.symmetric
    gen = torch.Generator().manual_seed(1)
    dense = []
    for shard, rows in SHARDS.items():
        q = torch.randint(-8, 8, (rows, 256), generator=gen, dtype=torch.int8)
        scale = torch.rand(rows, 256 // group, generator=gen) * 0.02 + 0.002
        layer.weight_loader(layer.weight_packed, helpers.pack_to_int32(q, 4), shard)
        layer.weight_loader(layer.weight_scale, scale, shard)
        layer.weight_shape.weight_loader(layer.weight_shape, torch.tensor([rows, 256]), shard)
        zero = torch.zeros(rows, 256 // group, dtype=torch.int8)
        if not symmetric:
            zero = torch.randint(-8, 8, (rows, 256 // group), generator=gen, dtype=torch.int8)
            layer.weight_loader(layer.weight_zero_point, helpers.pack_to_int32(zero, 4, packed_dim=0), shard)
        cols = torch.arange(256) // group
        dense.append((q.double() - zero.double()[:, cols]) * scale.double()[:, cols])
    layer.quant_method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight_shape")
    assert layer.weight_packed.shape == (32, 256) and layer.weight_packed.is_contiguous()
    assert layer.weight_scale.shape == (256 // group, 256)
    assert hasattr(layer, "weight_zero_point") != symmetric
    x = torch.randn(3, 256)
    expected = x.double() @ torch.cat(dense).t()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_w4a16_checkpoint_shape_mismatch_names_the_layer():
    layer = qkv_layer(W4A16)
    with pytest.raises(ValueError, match=r"qkv_proj: checkpoint weight_shape \(64, 128\) \(shard 'k'\)"):
        layer.weight_shape.weight_loader(layer.weight_shape, torch.tensor([64, 128]), "k")


def test_w4a16_rejects_untileable_sizes():
    with pytest.raises(ValueError, match=r"down_proj: input size 96 must be a multiple of 8 and of the group size 128"):
        Linear(96, 64, quant_config=config_for(W4A16), prefix="model.layers.0.mlp.down_proj")


# ---------------------------------------------------------------- end to end
PROMPTS = [[5, 17, 300, 42, 7, 99, 12, 250, 61, 8, 14, 71, 33], [11, 12, 13], [400, 2, 90, 91, 92, 93, 94, 95, 96]]
NEW_TOKENS = 8
# W8A8 logits may differ from the reference by this fraction of the logit spread (see assert_logits_close).
W8A8_NOISE = 0.05
W8A8_GREEDY_TOKENS = 4
# name -> (compressed-tensors preset, weight overrides)
CHECKPOINTS = {
    "w8a8": ("W8A8", {}),
    "w4a16-g128": ("W4A16", {}),
    "w4a16-g32": ("W4A16", {"group_size": 32}),
    "w4a16-asym": ("W4A16_ASYM", {}),
}


def quantize_with_compressed_tensors(base: Path, out: Path, preset: str, overrides: dict) -> Path:
    """Quantize a float checkpoint with the compressed-tensors library: apply a preset scheme,
    compute scales and zero points from the weights (min-max, as a memoryless observer does),
    compress and save."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStrategy,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.weights = scheme.weights.model_copy(update=overrides)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            w = module.weight
            if args.strategy == QuantizationStrategy.CHANNEL:
                lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            else:
                grouped = w.reshape(w.shape[0], -1, args.group_size)
                lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
            scale, zero = calculate_qparams(lo, hi, args)
            module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(base / name, out / name)
    return out


def base_checkpoint() -> Path:
    # Sizes are multiples of 128 so that group-128 quantization tiles every layer.
    return tiny_model_dir("qwen3", tie=False, hidden_size=128, intermediate_size=256, head_dim=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Dict[str, Path]:
    pytest.importorskip("compressed_tensors")
    base = base_checkpoint()
    root = tmp_path_factory.mktemp("ct")
    return {name: quantize_with_compressed_tensors(base, root / name, preset, overrides)
            for name, (preset, overrides) in CHECKPOINTS.items()}


def reference_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """transformers' model with the weights compressed-tensors decompresses from the checkpoint."""
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    if group["weights"]["symmetric"]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        # transformers' loader expects unpacked zero points and rejects the packed [N/8, G]
        # tensor the library saves; decompress with the library and load the dense weights.
        model = AutoModelForCausalLM.from_pretrained(base_checkpoint(), dtype=dtype)
        model.load_state_dict(library_decompressed_weights(path, group), strict=False)
    return model.to(device).eval()


def library_decompressed_weights(path: Path, group: dict) -> Dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
    tensors = load_file(str(path / "model.safetensors"))
    modules = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".weight_packed")}
    dense = {}
    for module in modules:
        local = {name[len(module) + 1:]: t for name, t in tensors.items() if name.startswith(module + ".")}
        dense[f"{module}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    return dense


def engine_logits(scheduler) -> torch.Tensor:
    runner = scheduler.runner
    reqs = []
    for i, ids in enumerate(PROMPTS):
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=greedy(1), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    lens = [len(p) for p in PROMPTS]
    slots = runner.token_to_kv_pool_allocator.alloc(sum(lens))
    batch = ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * len(lens), lens, slots, [True] * len(lens))
    return runner.forward(runner.build_forward_batch(batch))


def reference_logits(model, device: str = "cpu") -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(torch.tensor([ids], device=device)).logits[0, -1].float() for ids in PROMPTS])


def reference_greedy(model) -> List[List[int]]:
    outs = []
    with torch.no_grad():
        for ids in PROMPTS:
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            outs.append(out[0, len(ids):].tolist())
    return outs


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Weight-only schemes match to float32 noise. W8A8 quantizes activations, so float32 noise
    in the hidden states can move a value across a rounding boundary: a few percent of the
    logit spread, the top token unchanged."""
    assert torch.equal(actual.argmax(-1), expected.argmax(-1)), name
    spread = expected.std(dim=-1, keepdim=True)
    bound = W8A8_NOISE if name == "w8a8" else 1e-4
    assert ((actual - expected).abs() / spread).max() < bound, name



@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_match_transformers(checkpoints, name):
    path = checkpoints[name]
    scheduler = make_scheduler(path, max_total_tokens=256)
    method = scheduler.runner.model.model.layers[0].self_attn.qkv_proj.quant_method
    assert type(method.scheme).__name__ == ("W8A8Int8Scheme" if name == "w8a8" else "WNA16Scheme")
    assert_logits_close(engine_logits(scheduler), reference_logits(reference_model(path)), name)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_output_matches_transformers(checkpoints, name):
    """Weight-only schemes: identical greedy output. W8A8: identical short generations; longer
    ones may part at a near-tie, where activation rounding noise (see assert_logits_close)
    exceeds the gap between the two best tokens."""
    path = checkpoints[name]
    scheduler = make_scheduler(path, max_total_tokens=256)
    reqs = run_requests(scheduler, PROMPTS, [greedy(NEW_TOKENS, ignore_eos=True)] * len(PROMPTS))
    compared = W8A8_GREEDY_TOKENS if name == "w8a8" else NEW_TOKENS
    actual = [reqs[str(i)].output_ids[:compared] for i in range(len(PROMPTS))]
    assert actual == [tokens[:compared] for tokens in reference_greedy(reference_model(path))]


def test_method_flag_and_float_modules(checkpoints):
    config = GlobalConfig()
    config.server.model_path = str(checkpoints["w4a16-g32"])
    config.server.device, config.server.dtype, config.server.max_total_tokens = "cpu", "float32", 64
    config.quantization.method = "compressed-tensors"
    config.validate()
    model = build_scheduler(config, check_invariants=True).runner.model
    assert type(model.model.layers[1].mlp.down_proj.quant_method.scheme).__name__ == "WNA16Scheme"
    assert model.lm_head.weight.dtype == torch.float32 and model.model.embed_tokens.weight.dtype == torch.float32
    assert not any("weight_shape" in name for name, _ in model.named_parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_on_gpu(checkpoints, name):
    """The whole model on the GPU kernels (Triton, CUTLASS) in float16 vs transformers in float16."""
    path = checkpoints[name]
    scheduler = make_scheduler(path, max_total_tokens=256, device="cuda", dtype="float16",
                               attention_backend="torch_native", max_running_requests=4)
    actual = engine_logits(scheduler)
    expected = reference_logits(reference_model(path, torch.float16, "cuda"), "cuda")
    spread = expected.std(dim=-1, keepdim=True)
    # W8A8 re-quantizes every activation to int8: one fp16 rounding difference upstream can flip
    # an activation's int8 step, so its worst logit moves further than the weight-only schemes'
    # (measured on an H200: 0.14 of the spread).
    bound = 0.2 if name == "w8a8" else 0.1
    assert ((actual - expected).abs() / spread).max() < bound, name


@pytest.mark.gpu
@pytest.mark.parametrize("name", [name for name in CHECKPOINTS if name != "w8a8"])
def test_one_row_decode_defers_the_norms_on_gpu(checkpoints, name, monkeypatch):
    """At one row the W4A16 GEMVs run every norm but the final one deferred
    (pymllm.layers.deferred_norm; the first layer's produced by the embedding): a decode step's
    logits against transformers' on the prompt plus the new token, in float16."""
    # The package re-exports the function under the module's name, so fetch the module itself.
    gemv_module = importlib.import_module("mllm_kernel.cuda.jit.w4a16_gemv")
    calls = {"produce": 0, "consume": 0}

    def counted(function, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(gemv_module, "w4a16_gemv_add_norm", counted(gemv_module.w4a16_gemv_add_norm, "produce"))
    monkeypatch.setattr(gemv_module, "w4a16_gemv_normed", counted(gemv_module.w4a16_gemv_normed, "consume"))
    path = checkpoints[name]
    scheduler = make_scheduler(path, max_total_tokens=256, device="cuda", dtype="float16",
                               attention_backend="torch_native", disable_cuda_graph=True)
    runner = scheduler.runner
    prompt = PROMPTS[0]
    req = Req(rid="0", origin_input_ids=prompt, sampling_params=greedy(2), seed=0)
    req.req_pool_idx = runner.req_to_token_pool.alloc()
    alloc = runner.token_to_kv_pool_allocator.alloc
    extend = ScheduledBatch(ForwardMode.EXTEND, [req], [0], [len(prompt)], alloc(len(prompt)), [True])
    token = int(runner.forward(runner.build_forward_batch(extend)).argmax(-1)[0])
    assert calls == {"produce": 0, "consume": 0}  # prefill rows are many: the norms run as kernels
    req.output_ids.append(token)
    decode = ScheduledBatch(ForwardMode.DECODE, [req], [len(prompt)], [1], alloc(1), [True])
    actual = runner.forward(runner.build_forward_batch(decode))[0]

    layers = runner.model.config.num_hidden_layers
    # The producers: o_proj in every layer, down_proj in all but the last (plus the embedding);
    # the consumers: every gate/up and every qkv.
    assert calls == {"produce": 2 * layers - 1, "consume": 2 * layers}
    model = reference_model(path, torch.float16, "cuda")
    with torch.no_grad():
        expected = model(torch.tensor([prompt + [token]], device="cuda")).logits[0, -1].float()
    spread = expected.std()
    assert ((actual - expected).abs() / spread).max() < 0.1, name

"""bench_one_batch on CPU: rows, sizing defaults, dummy weights from a bare config.json, profiling,
image requests through the tiny Qwen3-VL, and the Qwen3-VL-8B benchmark config."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from pymllm import bench_one_batch as bench
from pymllm import bench_roofline as roofline
from pymllm.bench_images import load_image_prompts
from pymllm.configs import ConfigError
from pymllm.testing.tiny_models import tiny_model_dir, tiny_vl_model_dir

FIELDS = {
    "run_name", "batch_size", "input_len", "output_len", "prefill_latency", "prefill_throughput",
    "median_decode_latency", "median_decode_throughput", "total_latency", "overall_throughput",
    "hbm_bandwidth_gbs", "decode_floor_latency", "decode_vs_floor", "decode_graph_latency", "matmul_tflops", "prefill_tflops",
    "prefill_vs_matmul_rate", "device", "dtype", "cuda_graph", "overlap", "attention_backend", "commit", "command",
    "model", "architecture", "load_format", "prompt_logprobs", "timestamp",
}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_writes_one_row_per_case(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    argv = [
        "--server.model_path", str(tiny_model_dir("qwen3")), "--server.device", "cpu",
        "--server.log_level", "warning", "--run-name", "cpu-sweep",
        "--batch-size", "1", "2", "--input-len", "8", "--output-len", "4", "--result-filename", str(out),
    ]
    assert bench.main(argv) == 0
    rows = _rows(out)
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in rows] == [(1, 8, 4), (2, 8, 4)]
    for row in rows:
        assert set(row) == FIELDS
        assert row["run_name"] == "cpu-sweep" and row["device"] == "cpu" and row["dtype"] == "float32"
        assert row["attention_backend"] == "torch_native" and row["cuda_graph"] is False
        assert row["overlap"] is True  # the server's default
        assert row["decode_graph_latency"] is None  # no graphs on the CPU
        assert row["architecture"] == "Qwen3ForCausalLM" and row["load_format"] == "auto"
        assert row["command"].startswith("python -m pymllm.bench_one_batch --server.model_path")
        assert 0 < row["median_decode_latency"] and 0 < row["prefill_latency"]
        # The sum of the timed phases; a median stands in for the three decode steps, and a
        # loaded 2-core CI machine makes single steps noisy, hence the wide band.
        total = row["prefill_latency"] + 3 * row["median_decode_latency"]
        assert 0.5 * total <= row["total_latency"] <= 3 * total
        assert row["overall_throughput"] == pytest.approx(row["batch_size"] * 12 / row["total_latency"])
        assert row["decode_vs_floor"] == pytest.approx(row["median_decode_latency"] / row["decode_floor_latency"])
        assert row["hbm_bandwidth_gbs"] > 0 and row["matmul_tflops"] > 0 and row["prefill_vs_matmul_rate"] > 0
    assert "bs=2 in=8 out=4" in capsys.readouterr().out
    assert all(row["prompt_logprobs"] is False for row in rows)


def test_prompt_scoring_runs_in_the_prefill(tmp_path, monkeypatch):
    from pymllm.executor import model_runner

    scored = []
    real = model_runner.score_prompt_rows
    monkeypatch.setattr(model_runner, "score_prompt_rows",
                        lambda head, hidden, scoring: scored.append(list(scoring.counts)) or real(head, hidden, scoring))
    out = tmp_path / "rows.jsonl"
    argv = ["--server.model_path", str(tiny_model_dir("qwen3")), "--server.device", "cpu",
            "--server.log_level", "warning", "--batch-size", "2", "--input-len", "8", "--output-len", "2",
            "--prompt-logprobs", "--result-filename", str(out)]
    assert bench.main(argv) == 0
    assert _rows(out)[0]["prompt_logprobs"] is True
    assert scored == [[7, 7], [7, 7]]  # the warm-up case and the measured one: 7 positions per prompt


def test_overlapped_decode_produces_the_synchronous_tokens(monkeypatch):
    """run_case's overlapped decode (each step launched behind the one in flight, tokens fed on
    the device) leaves every request with the tokens of the step-by-step loop, one interval per
    step; --server.disable_overlap_schedule puts ``overlap: false`` in the rows."""
    from pymllm.configs.global_config import GlobalConfig
    from pymllm.executor.model_runner import load_model_runner

    config = GlobalConfig()
    config.server.model_path, config.server.device = str(tiny_model_dir("qwen3")), "cpu"
    config.validate()
    runner = load_model_runner(config)
    outputs = {}
    real = bench.Req

    def recording_req(*args, **kwargs):
        req = real(*args, **kwargs)
        outputs.setdefault(overlap, []).append(req)
        return req

    monkeypatch.setattr(bench, "Req", recording_req)
    for overlap in (False, True):
        times = bench.run_case(runner, 2, 7, 6, seed=3, overlap=overlap)
        assert len(times.decode) == 5 and all(t > 0 for t in times.decode)
    got = [r.output_ids for r in outputs[True]]
    assert got == [r.output_ids for r in outputs[False]] and all(len(ids) == 6 for ids in got)
    config, _ = bench.parse_args(["--server.disable_overlap_schedule", "--server.device", "cpu"])
    assert config.server.disable_overlap_schedule is True


def test_dummy_weights_from_a_bare_config_and_profile(tmp_path, monkeypatch):
    # Only config.json: no tokenizer files and no weights are needed for a dummy run.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_model_dir("llama", tie=False) / "config.json", model_dir / "config.json")
    traces = tmp_path / "traces"
    monkeypatch.setenv("PYMLLM_TORCH_PROFILER_DIR", str(traces))
    out = tmp_path / "rows.jsonl"
    argv = [
        "--server.model_path", str(model_dir), "--server.load_format", "dummy", "--server.device", "cpu",
        "--server.log_level", "warning", "--run-name", "prof", "--batch-size", "2", "--input-len", "6",
        "--output-len", "1", "3", "--result-filename", str(out),
        "--profile", "--profile-stage", "decode", "--profile-steps", "1",
    ]
    assert bench.main(argv) == 0
    one, three = _rows(out)
    assert one["load_format"] == "dummy" and one["architecture"] == "LlamaForCausalLM"
    assert one["median_decode_latency"] is None and one["decode_vs_floor"] is None
    assert three["median_decode_latency"] > 0
    trace = traces / "prof_bs2_in6_out3_decode.trace.json"
    assert trace.is_file() and "traceEvents" in trace.read_text()


IMAGE_FIELDS = {"image_size", "images_per_request", "image_tokens", "prompt_len", "vit_latency", "prefill_text_latency"}


def test_image_requests_report_vit_and_prefill(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    argv = [
        "--server.model_path", str(tiny_vl_model_dir()), "--server.device", "cpu", "--server.log_level", "warning",
        "--batch-size", "2", "--input-len", "8", "--output-len", "3", "--image", "32x24",
        "--images-per-request", "2", "--result-filename", str(out),
    ]
    assert bench.main(argv) == 0
    (row,) = _rows(out)
    assert set(row) == FIELDS | IMAGE_FIELDS
    assert row["architecture"] == "Qwen3VLForConditionalGeneration"
    assert row["image_size"] == "32x24" and row["images_per_request"] == 2
    # 32x24 stays 32x24 under the tiny processor (4x4 patches, 2x2 merge): 4x3 tokens per image.
    assert row["image_tokens"] == 2 * 12
    assert row["prompt_len"] == 8 + 2 * (12 + 2)  # + vision-start / vision-end per image
    assert 0 < row["vit_latency"] < row["prefill_latency"]
    assert row["prefill_text_latency"] == pytest.approx(row["prefill_latency"] - row["vit_latency"])
    assert row["prefill_throughput"] == pytest.approx(2 * row["prompt_len"] / row["prefill_latency"])
    assert row["median_decode_latency"] > 0
    assert "incl. ViT" in capsys.readouterr().out
    # Image requests score their prompts too (run_case checks every position was scored).
    scored = tmp_path / "scored.jsonl"
    argv[argv.index(str(out))] = str(scored)
    assert bench.main(argv + ["--prompt-logprobs"]) == 0
    assert _rows(scored)[0]["prompt_logprobs"] is True


def test_image_dummy_run_needs_the_processor_config(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_vl_model_dir() / "config.json", model_dir / "config.json")
    argv = [
        "--server.model_path", str(model_dir), "--server.load_format", "dummy", "--server.device", "cpu",
        "--server.log_level", "warning", "--batch-size", "1", "--input-len", "4", "--output-len", "2",
        "--image", "16x16", "--result-filename", str(tmp_path / "rows.jsonl"),
    ]
    assert bench.main(argv) == 2
    assert "preprocessor_config.json" in capsys.readouterr().err
    shutil.copy(tiny_vl_model_dir() / "preprocessor_config.json", model_dir / "preprocessor_config.json")
    assert bench.main(argv) == 0
    (row,) = _rows(tmp_path / "rows.jsonl")
    assert row["load_format"] == "dummy" and row["image_tokens"] == 4 and row["vit_latency"] > 0


VL_8B = Path(__file__).resolve().parents[2] / "benchmarks/configs/qwen3-vl-8b"


def _vl_8b_config(model_dir=VL_8B):
    from pymllm.configs import GlobalConfig
    from pymllm.configs.model_config import load_model_config

    config = GlobalConfig()
    config.server.model_path = str(model_dir)
    config.server.load_format = "dummy"
    return config, load_model_config(config.server, torch.device("cpu"))


def test_qwen3_vl_8b_bench_config_geometry():
    """benchmarks/configs/qwen3-vl-8b (the public Qwen3-VL-8B-Instruct config.json and
    preprocessor_config.json) as our loader and bench_one_batch --image read it."""
    from transformers import Qwen3VLForConditionalGeneration as Reference

    from pymllm.layers.rotary_embedding import _rope_parameters
    from pymllm.models.qwen3_vl import Qwen3VLForConditionalGeneration, mrope_parameters

    config, mc = _vl_8b_config()
    assert mc.architecture == "Qwen3VLForConditionalGeneration"
    text, vision = mc.text_config, mc.hf_config.vision_config
    assert (mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.vocab_size) == (36, 8, 128, 151936)
    assert (text.hidden_size, text.num_attention_heads, text.intermediate_size) == (4096, 32, 12288)
    assert _rope_parameters(text)["rope_theta"] == 5000000
    assert mrope_parameters(text) == ([24, 20, 20], True)
    assert mc.context_length == 262144 and mc.eos_token_ids == [151645]
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (27, 1152, 4304, 16)
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
    assert (vision.out_hidden_size, vision.num_position_embeddings) == (4096, 2304)
    assert list(vision.deepstack_visual_indexes) == [8, 16, 24]
    hf = mc.hf_config
    assert (hf.image_token_id, hf.video_token_id, hf.vision_start_token_id, hf.vision_end_token_id) == (
        151655, 151656, 151652, 151653)
    # Built without memory: the published parameter count, the same as transformers' model.
    with torch.device("meta"):
        ours = Qwen3VLForConditionalGeneration(hf)
        reference = Reference._from_config(hf)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters()) == 8_767_123_696
    assert sum(p.numel() for p in ours.model.visual.parameters()) == 576_388_336
    # The image processor as bench_one_batch --image loads it (16-pixel patches, 2x2 merge).
    for size, tokens in (((448, 448), 28 * 28 // 4), ((1024, 768), 64 * 48 // 4)):
        prompts = load_image_prompts(config, mc, size, 1)
        assert prompts.tokens_per_image == tokens and prompts.extra_prompt_tokens == tokens + 2


@pytest.mark.parametrize("size,image_tokens", [("448x448", 196), ("1024x768", 768)])
def test_qwen3_vl_8b_image_bench_cpu_sized(tmp_path, size, image_tokens):
    """The suite's VL runs on a CPU-sized copy: the 8B config and processor with a 2-layer
    text model and a 2-block vision tower (same patching, mrope sections and token ids)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(VL_8B / "preprocessor_config.json", model_dir)
    config = json.loads((VL_8B / "config.json").read_text())
    config["text_config"].update(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=256)
    config["vision_config"].update(depth=2, hidden_size=64, num_heads=2, intermediate_size=128,
                                   deepstack_visual_indexes=[0, 1], out_hidden_size=128)
    (model_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "rows.jsonl"
    argv = [
        "--server.model_path", str(model_dir), "--server.load_format", "dummy", "--server.device", "cpu",
        "--server.log_level", "warning", "--run-name", f"qwen3-vl-8b-{size}", "--batch-size", "1",
        "--input-len", "32", "--output-len", "3", "--image", size, "--result-filename", str(out),
    ]
    assert bench.main(argv) == 0
    (row,) = _rows(out)
    assert row["architecture"] == "Qwen3VLForConditionalGeneration" and row["image_size"] == size
    assert row["image_tokens"] == image_tokens and row["prompt_len"] == 32 + image_tokens + 2
    assert 0 < row["vit_latency"] < row["prefill_latency"] and row["median_decode_latency"] > 0
    assert row["prefill_text_latency"] == pytest.approx(row["prefill_latency"] - row["vit_latency"])


def test_image_flag_checks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--image", "32"])
    with pytest.raises(ConfigError, match="--images-per-request"):
        bench.parse_args(["--image", "8x8", "--images-per-request", "0"])
    argv = [
        "--server.model_path", str(tiny_model_dir("qwen3")), "--server.device", "cpu", "--server.log_level",
        "warning", "--image", "8x8", "--result-filename", str(tmp_path / "rows.jsonl"),
    ]
    assert bench.main(argv) == 2
    assert "needs an image model" in capsys.readouterr().err


def test_sizing_defaults_come_from_the_sweep():
    config, args = bench.parse_args(["--batch-size", "3", "5", "--input-len", "10", "--output-len", "4"])
    assert config.server.max_running_requests == 5
    assert config.server.max_total_tokens == 5 * 14
    assert args.cases() == [(3, 10, 4), (5, 10, 4)]
    config, _ = bench.parse_args(["--batch-size", "2", "--server.max_total_tokens", "999"])
    assert config.server.max_total_tokens == 999
    with pytest.raises(ConfigError, match="max_running_requests"):
        bench.parse_args(["--batch-size", "8", "--server.max_running_requests", "4"])
    with pytest.raises(ConfigError, match="--output-len"):
        bench.parse_args(["--output-len", "0"])


def test_main_reports_cases_that_do_not_fit(tmp_path, capsys):
    argv = [
        "--server.model_path", str(tiny_model_dir("qwen3")), "--server.device", "cpu",
        "--server.log_level", "warning", "--input-len", "500", "--output-len", "100",
        "--result-filename", str(tmp_path / "rows.jsonl"),
    ]
    assert bench.main(argv) == 2
    assert "context length" in capsys.readouterr().err


def test_cost_model_arithmetic():
    assert roofline.causal_pairs(4, None) == 10
    assert roofline.causal_pairs(4, 8) == 10
    assert roofline.causal_pairs(5, 2) == 3 + 3 * 2
    cost = roofline.ModelCost(
        decode_weight_bytes=1000, kv_bytes_per_token=10, linear_macs_per_token=100, lm_head_macs=50,
        attention=[(2, 4, None)],
    )
    assert roofline.prefill_flops(cost, 2, 3) == 2 * (2 * 3 * 100 + 2 * 50) + 4 * 2 * 4 * 2 * 6
    # 1000 weight bytes + 2 sequences x (3 + 4 / 2) tokens x 10 bytes, at 100 bytes/s.
    assert roofline.decode_floor_seconds(cost, 2, 3, 4, 100.0) == pytest.approx(11.0)


@pytest.mark.parametrize("tie", [True, False])
def test_model_cost_counts_what_a_decode_step_reads(tie):
    from pymllm.layers.vocab_embedding import LMHead, VocabEmbedding

    model = torch.nn.Module()
    model.embed = VocabEmbedding(10, 4)
    model.head = LMHead(10, 4)
    if tie:
        model.head.tie_to(model.embed)
    model.proj = torch.nn.Linear(4, 4, bias=False)
    kv_pool = types.SimpleNamespace(num_layers=2, num_kv_heads=1, head_dim=4, v_head_dim=4, dtype=torch.float16)
    cost = roofline.model_cost(model, kv_pool)
    # The embedding is a row gather unless it doubles as the LM head.
    assert cost.decode_weight_bytes == (40 + 16) * 4
    assert cost.kv_bytes_per_token == 2 * 1 * (4 + 4) * 2
    assert cost.lm_head_macs == 40 and cost.linear_macs_per_token == 0


@pytest.mark.gpu
def test_gpu_rows_report_the_decode_graph_time(tmp_path):
    """With CUDA graphs a row carries the decode graph's GPU time alone, which a whole step
    (host work included) cannot undercut by much."""
    pytest.importorskip("flashinfer")
    out = tmp_path / "rows.jsonl"
    argv = [
        "--server.model_path", str(tiny_model_dir("qwen3", head_dim=128)), "--server.load_format", "dummy",
        "--server.device", "cuda", "--server.dtype", "bfloat16", "--server.log_level", "warning",
        "--run-name", "gpu", "--batch-size", "1", "3", "--input-len", "16", "--output-len", "8",
        "--result-filename", str(out),
    ]
    assert bench.main(argv) == 0
    for row in _rows(out):
        assert row["cuda_graph"] is True
        assert 0 < row["decode_graph_latency"] < 1.2 * row["median_decode_latency"]


def test_copy_bandwidth_is_the_best_round(monkeypatch):
    """Each round times its copies alone (a synchronisation before and after) and the fastest
    round counts: here the clock gives rounds of 4, 1 and 2 seconds."""
    ticks = iter([0.0, 4.0, 10.0, 11.0, 20.0, 22.0])
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: next(ticks))
    nbytes = 1 << 20
    got = roofline.measure_copy_bandwidth(torch.device("cpu"), nbytes=nbytes, iters=3, rounds=3)
    assert got == pytest.approx(2 * nbytes * 3 / 1.0)

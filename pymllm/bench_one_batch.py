"""python -m pymllm.bench_one_batch: latency of one static batch through the ModelRunner.

No server, tokenizer, scheduler or detokenizer: synthetic prompts go straight into a
ModelRunner, one prefill (ForwardMode.EXTEND) and then ``output_len - 1`` decode steps (the
prefill already yields the first output token, as in SGLang's bench_one_batch). Every timed
region is one engine step, ``ModelRunner.run_batch`` (batch tensors, forward, sampling): it
starts after a device synchronisation and ends when run_batch hands back the sampled token ids
as host integers, which it can only do once the step's GPU work is done (its last act is
waiting for them). The device synchronisation after it runs outside the timed region: it adds
no work of the step, only its own latency (15-20 us on an H200). Each (batch size, input length, output length) case
appends one JSON line to --result-filename.

Decode steps run as the server runs them: overlapped (``Scheduler(overlap=True)``; off with
``--server.disable_overlap_schedule``), each step launched behind the one in flight with its
input tokens taken on the device, so a decode step's time is the interval between two steps'
tokens reaching the host, as a streaming client sees them (the first interval is the first
step's whole latency). Synchronous steps are timed one by one as above. Rows say which
(``overlap``).

Besides latencies, each row puts the numbers next to what the hardware allows, both measured
once at start on the same device:
- decode: the HBM floor, (bytes of weights + KV read per step) / device-to-device copy
  bandwidth (read + write bytes counted, the best of a few rounds); ``decode_vs_floor`` =
  median step / floor.
- prefill: FLOPs of every linear layer plus causal attention over the prompt, per second,
  relative to a large dense matmul in the model dtype (``prefill_vs_matmul_rate``).

``--profile`` re-runs each case under torch.profiler after it was measured (so the timings
stay clean) and writes a Chrome trace into $PYMLLM_TORCH_PROFILER_DIR (default /tmp).

``--image WxH`` (image models, e.g. Qwen3-VL) gives every request ``--images-per-request``
random RGB images of that size, preprocessed as the tokenizer process does
(``pymllm.multimodal``): the prompt is, per image, vision-start + the expanded image
placeholders + vision-end, then ``--input-len`` random text tokens. The image processor config
(preprocessor_config.json) must sit in the model directory or --server.tokenizer_path, also
with ``--server.load_format dummy``. The row adds ``vit_latency``: the vision tower's calls
(one per request) inside the timed prefill, each between two device synchronisations, and
``prefill_text_latency`` = prefill - ViT.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from pymllm.bench_images import ImagePrompts, load_image_prompts, timed_vision
from pymllm.bench_roofline import (
    _sync,
    measure_copy_bandwidth,
    measure_matmul_rate,
    ModelCost,
    model_cost,
    prefill_flops,
    decode_floor_seconds,
)
from pymllm.configs.errors import ConfigError
from pymllm.configs.global_config import GlobalConfig, add_config_arguments, config_from_namespace
from pymllm.configs.model_config import load_model_config
from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor.model_runner import ModelRunner, resolve_device
from pymllm.multimodal.synthetic import image_size_arg
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams

logger = logging.getLogger("bench_one_batch")

PROFILE_STAGES = ("prefill", "decode", "all")
_WARMUP_OUTPUT_LEN = 4


@dataclass
class BenchArgs:
    run_name: str = "default"
    batch_size: List[int] = field(default_factory=lambda: [1])
    input_len: List[int] = field(default_factory=lambda: [1024])
    output_len: List[int] = field(default_factory=lambda: [16])
    result_filename: str = "result.jsonl"
    profile: bool = False
    profile_stage: str = "all"
    profile_steps: int = 3
    image: Optional[Tuple[int, int]] = None  # (width, height) with --image
    images_per_request: int = 1
    prompt_logprobs: bool = False  # requests score their prompts (SamplingParams.prompt_logprobs)
    # Prompt tokens besides --input-len (the image tokens), known once the processor is loaded.
    extra_prompt_tokens: int = 0
    # Whether --server.max_total_tokens is derived from the sweep (not given on the command line).
    kv_sized_by_sweep: bool = False

    def cases(self) -> List[tuple]:
        return list(itertools.product(self.batch_size, self.input_len, self.output_len))

    def kv_tokens_needed(self) -> int:
        return max(b * (i + self.extra_prompt_tokens + o) for b, i, o in self.cases())


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pymllm.bench_one_batch", description=__doc__.split("\n")[0])
    add_config_arguments(parser)
    bench = parser.add_argument_group("bench")
    bench.add_argument("--run-name", default="default", help="Label stored in every result row.")
    bench.add_argument("--batch-size", type=int, nargs="+", default=[1], help="Batch sizes to sweep.")
    bench.add_argument("--input-len", type=int, nargs="+", default=[1024], help="Prompt lengths to sweep.")
    bench.add_argument("--output-len", type=int, nargs="+", default=[16],
                       help="Output tokens per sequence, the prefill's token included.")
    bench.add_argument("--result-filename", default="result.jsonl", help="JSONL file the rows are appended to.")
    bench.add_argument("--profile", action="store_true", help="Also write a torch.profiler trace per case.")
    bench.add_argument("--profile-stage", choices=PROFILE_STAGES, default="all", help="What the trace covers.")
    bench.add_argument("--profile-steps", type=int, default=3, help="Decode steps in the trace.")
    bench.add_argument("--image", type=image_size_arg, default=None, metavar="WxH",
                       help="Give every request random images of this size (image models only).")
    bench.add_argument("--images-per-request", type=int, default=1, help="Images per request with --image.")
    bench.add_argument("--prompt-logprobs", action="store_true",
                       help="Every request scores its prompt (the logprob of each prompt token, as echo with "
                            "logprobs asks); the prefill's time includes the scoring.")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple:
    """(GlobalConfig, BenchArgs). Unset sizing flags are derived from the sweep."""
    ns = make_parser().parse_args(argv)
    bench = BenchArgs(
        run_name=ns.run_name, batch_size=ns.batch_size, input_len=ns.input_len, output_len=ns.output_len,
        result_filename=ns.result_filename, profile=ns.profile, profile_stage=ns.profile_stage,
        profile_steps=ns.profile_steps, image=ns.image, images_per_request=ns.images_per_request,
        prompt_logprobs=ns.prompt_logprobs,
    )
    for name in ("batch_size", "input_len", "output_len"):
        if min(getattr(bench, name)) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: values must be >= 1")
    if bench.images_per_request < 1:
        raise ConfigError("--images-per-request must be >= 1")
    given = vars(ns)
    # Size the pools for the sweep unless told otherwise: no idle KV memory, and only the
    # CUDA graphs the sweep can use get captured.
    if "server.max_running_requests" not in given:
        ns.__dict__["server.max_running_requests"] = max(bench.batch_size)
    bench.kv_sized_by_sweep = "server.max_total_tokens" not in given
    if bench.kv_sized_by_sweep:
        ns.__dict__["server.max_total_tokens"] = bench.kv_tokens_needed()
    config = config_from_namespace(ns)
    if config.server.max_running_requests < max(bench.batch_size):
        raise ConfigError(
            f"--server.max_running_requests {config.server.max_running_requests} is below "
            f"--batch-size {max(bench.batch_size)}"
        )
    return config, bench


# ---------------- one case ----------------
@dataclass
class CaseTimes:
    prefill: float
    decode: List[float]
    prompt_len: int
    vit: Optional[float] = None  # ViT time within ``prefill`` (image requests only)
    decode_graph: Optional[float] = None  # GPU time of the decode graph alone (CUDA graphs only)


def _profiler(device: torch.device):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _decode_batch(runner: ModelRunner, reqs: List[Req], position: int) -> ScheduledBatch:
    """Every request's decode step at ``position``, with new KV slots."""
    bs = len(reqs)
    slots = runner.token_to_kv_pool_allocator.alloc(bs)
    return ScheduledBatch(ForwardMode.DECODE, reqs, [position] * bs, [1] * bs, slots, [True] * bs)


def _decode_overlapped(runner: ModelRunner, reqs: List[Req], prompt_len: int, steps: int) -> List[float]:
    """Decode steps launched each behind the one in flight (as the overlapping scheduler does);
    per step, the time since the previous step's tokens reached the host."""
    _sync(runner.device)
    last = time.perf_counter()
    pending = runner.launch_batch(_decode_batch(runner, reqs, prompt_len))
    times = []
    for i in range(steps):
        follower = (runner.launch_batch(_decode_batch(runner, reqs, prompt_len + i + 1), follows=pending)
                    if i + 1 < steps else None)
        result = runner.collect(pending)
        now = time.perf_counter()
        times.append(now - last)
        last = now
        for req, token in zip(reqs, result.next_token_ids):
            req.output_ids.append(token)
        pending = follower
    _sync(runner.device)
    return times


def run_case(
    runner: ModelRunner, bs: int, input_len: int, output_len: int, seed: int,
    profile_stage: Optional[str] = None, profile_steps: int = 0, trace_path: Optional[Path] = None,
    images: Optional[ImagePrompts] = None, overlap: bool = False, prompt_logprobs: bool = False,
) -> CaseTimes:
    """Prefill + decode of one synthetic batch on empty pools; returns step latencies (s).

    With ``profile_stage``, that stage (and at most ``profile_steps`` decode steps) runs
    under torch.profiler and the trace goes to ``trace_path``. With ``images``, every request
    carries its own random images (preprocessed here, before any timing). With ``overlap`` the
    decode steps run overlapped (``_decode_overlapped``). With ``prompt_logprobs`` the requests
    score their prompts in the prefill.
    """
    runner.clear()
    device = runner.device
    rng = np.random.default_rng(seed)
    vocab = runner.model_config.vocab_size
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True,
                            prompt_logprobs=prompt_logprobs).with_defaults({})
    reqs = []
    for i in range(bs):
        if images is None:
            ids, mm = rng.integers(0, vocab, input_len).tolist(), None
        else:
            ids, mm = images.prompt(rng, input_len)
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=params, seed=i, mm_inputs=mm)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    prompt_len = len(reqs[0].origin_input_ids)
    decode_steps = output_len - 1 if profile_stage is None else min(output_len - 1, profile_steps)
    if profile_stage == "prefill":
        decode_steps = 0
    prof = _profiler(device) if profile_stage is not None else None
    if prof is not None and profile_stage in ("prefill", "all"):
        prof.start()

    def step(batch: ScheduledBatch) -> float:
        _sync(device)
        start = time.perf_counter()
        result = runner.run_batch(batch)  # host ints: the step's GPU work is done
        elapsed = time.perf_counter() - start
        _sync(device)
        if prompt_logprobs and batch.mode.is_extend():
            scored = [len(entries) for entries in result.prompt_logprobs or []]
            if scored != [len(r.origin_input_ids) - 1 for r in reqs]:
                raise RuntimeError(f"the prefill scored {scored} prompt tokens per request")
        for req, token in zip(reqs, result.next_token_ids):
            req.output_ids.append(token)
        return elapsed

    slots = runner.token_to_kv_pool_allocator.alloc(bs * prompt_len)
    prefill_batch = ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * bs, [prompt_len] * bs, slots, [True] * bs)
    vit: List[float] = []
    with timed_vision(runner.model, device, vit) if images is not None else contextlib.nullcontext():
        prefill = step(prefill_batch)
    if prof is not None and profile_stage == "decode":
        prof.start()
    if overlap and decode_steps:
        decode = _decode_overlapped(runner, reqs, prompt_len, decode_steps)
    else:
        decode = [step(_decode_batch(runner, reqs, prompt_len + i)) for i in range(decode_steps)]
    if prof is not None:
        prof.stop()
        prof.export_chrome_trace(str(trace_path))
    graphs = runner.cuda_graph_runner
    graph_time = graphs.replay_seconds(bs) if graphs is not None and decode and graphs.fits(bs) else None
    return CaseTimes(prefill, decode, prompt_len, sum(vit) if images is not None else None, graph_time)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def make_row(
    bench: BenchArgs, config: GlobalConfig, runner: ModelRunner, cost: ModelCost, times: CaseTimes,
    bs: int, input_len: int, output_len: int, bandwidth: float, matmul_rate: float, command: str,
    images: Optional[ImagePrompts] = None,
) -> dict:
    decode_median = float(np.median(times.decode)) if times.decode else None
    total = times.prefill + sum(times.decode)
    prompt_len = times.prompt_len
    floor = decode_floor_seconds(cost, bs, prompt_len, output_len, bandwidth)
    # The FLOP count covers the text decoder only, so its rate is taken over the prefill
    # without the ViT.
    flops = prefill_flops(cost, bs, prompt_len)
    decoder_time = times.prefill - (times.vit or 0.0)
    device = runner.device
    row = {
        "run_name": bench.run_name,
        "batch_size": bs,
        "input_len": input_len,
        "output_len": output_len,
        "prefill_latency": times.prefill,
        "prefill_throughput": bs * prompt_len / times.prefill,
        "median_decode_latency": decode_median,
        "median_decode_throughput": bs / decode_median if decode_median else None,
        "total_latency": total,
        "overall_throughput": bs * (prompt_len + output_len) / total,
        "hbm_bandwidth_gbs": bandwidth / 1e9,
        "decode_floor_latency": floor,
        "decode_vs_floor": decode_median / floor if decode_median else None,
        # The decode graph replayed back to back: the step's GPU time; the median step minus it
        # is what the host adds (batch building, launch, sampling, their gaps).
        "decode_graph_latency": times.decode_graph,
        "matmul_tflops": matmul_rate / 1e12,
        "prefill_tflops": flops / decoder_time / 1e12,
        "prefill_vs_matmul_rate": flops / decoder_time / matmul_rate,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(runner.dtype).replace("torch.", ""),
        "cuda_graph": runner.cuda_graph_runner is not None,
        "overlap": not config.server.disable_overlap_schedule,
        "attention_backend": runner.attn_backend.name,
        "commit": git_commit(),
        "command": command,
        "model": runner.model_config.model_path,
        "architecture": runner.model_config.architecture,
        "load_format": config.server.load_format,
        "prompt_logprobs": bench.prompt_logprobs,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if images is not None:
        row.update({
            "image_size": "{}x{}".format(*images.size),
            "images_per_request": images.per_request,
            "image_tokens": images.image_tokens,
            "prompt_len": prompt_len,
            "vit_latency": times.vit,
            "prefill_text_latency": decoder_time,
        })
    return row


def _check_fits(bench: BenchArgs, runner: ModelRunner) -> None:
    extra = bench.extra_prompt_tokens
    images = f" + {extra} image tokens" if extra else ""
    for bs, input_len, output_len in bench.cases():
        if input_len + extra + output_len > runner.model_config.context_length:
            raise ConfigError(
                f"--input-len {input_len}{images} + --output-len {output_len} exceeds the context length "
                f"{runner.model_config.context_length}"
            )
        if bs * (input_len + extra + output_len) > runner.max_total_tokens:
            raise ConfigError(
                f"batch {bs}x({input_len}{images}+{output_len}) needs more KV slots than "
                f"--server.max_total_tokens {runner.max_total_tokens}"
            )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, bench = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    command = "python -m pymllm.bench_one_batch " + shlex.join(argv)
    server = config.server
    device = resolve_device(server.device)
    bandwidth = measure_copy_bandwidth(device)
    model_config = load_model_config(server, device)
    images = None
    if bench.image is not None:
        try:
            images = load_image_prompts(config, model_config, bench.image, bench.images_per_request)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        bench.extra_prompt_tokens = images.extra_prompt_tokens
        if bench.kv_sized_by_sweep:
            server.max_total_tokens = bench.kv_tokens_needed()
    matmul_rate = measure_matmul_rate(device, model_config.dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # return the measurement buffers before the KV pool is sized
    logger.info("copy bandwidth %.0f GB/s, %s matmul %.1f TFLOP/s", bandwidth / 1e9, model_config.dtype,
                matmul_rate / 1e12)
    runner = ModelRunner(config, model_config, device)
    runner.initialize()
    try:
        _check_fits(bench, runner)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cost = model_cost(runner.model, runner.kv_pool)
    bs0, in0, out0 = bench.cases()[0]
    overlap = not server.disable_overlap_schedule
    run_case(runner, bs0, in0, min(out0, _WARMUP_OUTPUT_LEN), server.random_seed, images=images, overlap=overlap,
             prompt_logprobs=bench.prompt_logprobs)
    out_path = Path(bench.result_filename)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    trace_dir = Path(os.environ.get("PYMLLM_TORCH_PROFILER_DIR", "/tmp"))
    for bs, input_len, output_len in bench.cases():
        times = run_case(runner, bs, input_len, output_len, server.random_seed, images=images, overlap=overlap,
                         prompt_logprobs=bench.prompt_logprobs)
        row = make_row(bench, config, runner, cost, times, bs, input_len, output_len, bandwidth, matmul_rate, command,
                       images)
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        decode = row["median_decode_latency"]
        vit = f" incl. ViT {times.vit * 1e3:.2f} ms" if times.vit is not None else ""
        print(
            f"bs={bs} in={input_len} out={output_len}: prefill {times.prefill * 1e3:.2f} ms{vit} "
            f"({row['prefill_throughput']:.0f} tok/s, {row['prefill_vs_matmul_rate']:.2f} of matmul rate), "
            + (f"decode {decode * 1e3:.3f} ms/step ({row['decode_vs_floor']:.2f}x HBM floor)" if decode else "no decode"),
            flush=True,
        )
        if bench.profile:
            trace_dir.mkdir(parents=True, exist_ok=True)
            trace = trace_dir / f"{bench.run_name}_bs{bs}_in{input_len}_out{output_len}_{bench.profile_stage}.trace.json"
            run_case(runner, bs, input_len, output_len, server.random_seed,
                     profile_stage=bench.profile_stage, profile_steps=bench.profile_steps, trace_path=trace,
                     images=images, overlap=overlap, prompt_logprobs=bench.prompt_logprobs)
            print(f"trace: {trace}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Qwen3-VL on a CUDA device (marked gpu): the fast path against the references.

A tiny random Qwen3-VL (DeepStack on; text head_dim 128, the head size whose FlashInfer modules
the suite's JIT warm-up builds, and Qwen3-VL-8B's interleaved mrope sections [24, 20, 20]).
Requests come from the tokenizer process's RequestTokenizer (image files, transformers' image
processor, placeholder expansion, mrope positions) and run in-process through the Scheduler.

- FlashInfer with decode CUDA graphs against torch_native eager, both bfloat16 (FlashInfer has
  no float32 kernels), for one image, four images of different sizes and aspect ratios in one
  prompt, and a staggered batch mixing image and text-only requests. Chunked prefill cuts
  through images, and decode batches padded to a captured graph size carry the mrope deltas
  of image rows (and zeros for text rows) in the graphs' static buffers.
- The first decode step (a CUDA-graph replay, three requests padded to four) and the prefill
  before it, FlashInfer in bfloat16, against transformers' Qwen3VLForConditionalGeneration run
  in float32 on the same GPU with the same weights.

How greedy tokens are compared. Any bf16 rounding difference (FlashInfer's attention against
PyTorch's) moves this random model's logits by about 1%, and its top-2 gaps are often that
small, so exact token equality over every step would be a flaky test. Each case therefore runs
three times: the reference (torch_native eager, free greedy); the fast path forced to take the
reference's tokens ("teacher forcing": every step sees the same batch, and every step's logits
are held to the bf16 tolerance); and the fast path free greedy. Where the fast path's own
argmax differs from the reference token in the forced run, the reference's top-2 margin is
below twice the logits difference there (a near-tie by construction, the difference itself
being within tolerance). Such flips must stay rare, and the free run's tokens must equal the
reference's up to the first flip of each request (all of them when nothing flips).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from pymllm.configs import GlobalConfig
from pymllm.configs.model_config import load_model_config
from pymllm.engine.forward_batch import ForwardMode
from pymllm.engine.io_struct import GenerateReqInput, TokenizedGenerateReq
from pymllm.executor.cuda_graph_runner import padded_batch_size
from pymllm.executor.model_runner import ModelRunner
from pymllm.executor.pending_batch import PendingBatch
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams
from pymllm.testing.tiny_models import build_tiny_vl_checkpoint
from pymllm.tests.helpers import cache_kwargs, request_tokenizer_for, write_random_images

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TEXT_CONFIG = dict(
    head_dim=128, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [24, 20, 20],
                     "mrope_interleaved": True},
)
# (height, width): wide, tall, tiny (upscaled to the minimum), square, one past max_pixels.
IMAGE_SIZES = [(30, 50), (100, 20), (5, 7), (40, 40), (90, 70)]
# Step by step (no overlapped decoding): a forced run's recorded positions and its forced tokens
# must be those of the reference's same step, which a follower one token ahead would shift.
SERVER = dict(max_total_tokens=2048, max_running_requests=4, max_prefill_tokens=48, disable_overlap_schedule=True)
FAST = dict(attention_backend="flashinfer")
REFERENCE = dict(attention_backend="torch_native", disable_cuda_graph=True)
# bf16 tolerances on float32 logits, per row: relative norm of the error, and the largest error
# relative to the row's largest magnitude; the mean tolerance bounds the relative norm averaged
# over all rows. The random model amplifies any rounding difference. Measured on the CPU: a
# torch_native attention that rounds its probabilities to bf16 before P @ V (as FlashInfer's
# tensor-core kernels do) moves rows by up to 1.8% (mean 1.1%); bf16 pymllm against float32
# transformers differs by up to 3.5% (max element 3.7%, mean 2%); an mrope delta off by one
# moves every image request's decode logits by 7% to 25%.
REL_TOL = 4e-2
MAX_ABS_FRAC = 5e-2
MEAN_REL_TOL = 2.5e-2
HF_REL_TOL = 7e-2
HF_MAX_ABS_FRAC = 8e-2
HF_MEAN_REL_TOL = 4e-2


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True).with_defaults({})


def _flashinfer() -> None:
    pytest.importorskip("flashinfer")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_vl_checkpoint(tmp_path_factory.mktemp("qwen3_vl_gpu"), text_config=dict(TEXT_CONFIG))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> List[str]:
    return write_random_images(tmp_path_factory.mktemp("images"), IMAGE_SIZES)


@pytest.fixture(scope="module")
def request_tokenizer(model_dir):
    return request_tokenizer_for(model_dir)


def _config(model_dir, device: str, **server) -> GlobalConfig:
    config = GlobalConfig()
    config.server.model_path = str(model_dir)
    config.server.device = device
    config.server.dtype = "bfloat16"
    for key, value in {**SERVER, **server}.items():
        setattr(config.server, key, value)
    config.validate()
    return config


def make_scheduler(model_dir, device: str = DEVICE, **server):
    from pymllm.orchestrator.scheduler_process import build_scheduler  # needs pyzmq

    return build_scheduler(_config(model_dir, device, **server), check_invariants=True)


@pytest.fixture(scope="module")
def schedulers(model_dir):
    """(reference, fast): built once; each case empties their prefix caches first."""
    _flashinfer()
    ref = make_scheduler(model_dir, **REFERENCE)
    fast = make_scheduler(model_dir, **FAST)
    graphs = fast.runner.cuda_graph_runner
    assert fast.runner.attn_backend.name == "flashinfer" and graphs is not None
    assert graphs.batch_sizes[:3] == [1, 2, 4]
    assert ref.runner.cuda_graph_runner is None and ref.runner.attn_backend.name == "torch_native"
    return ref, fast


# ---------------------------------------------------------------- requests
def chat(*parts) -> List[Dict]:
    content = [{"type": "text", "text": p} if not p.startswith("/") else {"type": "image_url", "image_url": {"url": p}}
               for p in parts]
    return [{"role": "user", "content": content}]


def tokenized(request_tokenizer, messages, rid: str) -> TokenizedGenerateReq:
    return request_tokenizer.tokenize(GenerateReqInput(rid=rid, messages=messages, sampling_params={}))


def case_requests(name: str, images: List[str]) -> Tuple[List[List[Dict]], List[int], List[int]]:
    """(messages, new tokens, arrival steps) of a case."""
    one = chat("Describe ", images[0], " briefly.")
    several = chat("Compare ", images[1], " with ", images[2], ", ", images[3], " and ", images[4], ".")
    if name == "one-image":
        return [one], [12], [0]
    if name == "several-images":
        return [several], [12], [0]
    assert name == "mixed-batch"
    text = [{"role": "user", "content": "Hello! How are you today?"}]
    late_text = [{"role": "user", "content": "The capital of France is"}]
    messages = [one, text, several, chat(images[4], "What is this?"), late_text]
    # Five requests under max_running_requests=4: decode batches of 1 to 4 (3 pads to 4), the
    # last ones text-only.
    return messages, [10, 7, 12, 9, 18], [0, 0, 1, 3, 6]


# ---------------------------------------------------------------- one run
@dataclass
class Run:
    outputs: Dict[str, List[int]] = field(default_factory=dict)
    # (rid, output position) -> float32 logits [vocab] on the CPU, sampled rows only.
    logits: Dict[Tuple[str, int], torch.Tensor] = field(default_factory=dict)
    # Per CUDA-graph replay: (batch size, padded size, whether mrope deltas were staged).
    replays: List[Tuple[int, int, bool]] = field(default_factory=list)


def run(sched, treqs: Sequence[TokenizedGenerateReq], new_tokens: Sequence[int], arrivals: Sequence[int],
        force: Optional[Run] = None) -> Run:
    """Greedy through the Scheduler, logits recorded; with ``force``, each sampled token is
    the one ``force`` produced at that (request, position) instead of this run's argmax."""
    sched.prefix_cache.reset()
    runner = sched.runner
    out = Run()

    def launch_sampling(logits: torch.Tensor, batch: ScheduledBatch, in_flight=None) -> PendingBatch:
        # The runner's sampling step (every launched batch goes through it), recording and forcing.
        tokens = logits.argmax(-1)
        for i, req in enumerate(batch.reqs):
            if batch.sample[i]:
                key = (req.rid, len(req.output_ids))
                out.logits[key] = logits[i].float().cpu()
                if force is not None:
                    tokens[i] = force.outputs[req.rid][key[1]]
        host, _, done = runner.readback.start(tokens)
        return PendingBatch(batch, tokens, host, done)

    graphs = runner.cuda_graph_runner
    replay = graphs.replay if graphs is not None else None

    def recording_replay(fb):
        # Short text-only extends replay the graphs too (one row per new token); count decodes.
        if fb.sample_rows is None:
            padded = padded_batch_size(fb.batch_size, graphs.batch_sizes)
            out.replays.append((fb.batch_size, padded, fb.mrope_position_deltas is not None))
        return replay(fb)

    runner._launch_sampling = launch_sampling
    if graphs is not None:
        graphs.replay = recording_replay
    try:
        reqs, step = {}, 0
        while len(reqs) < len(treqs) or sched.has_work():
            for i, t in enumerate(treqs):
                if arrivals[i] == step:
                    msg = TokenizedGenerateReq(t.rid, t.input_ids, greedy(new_tokens[i]), mm_inputs=t.mm_inputs)
                    reqs[t.rid] = sched.add_request(msg)
            sched.step()
            step += 1
            assert step < 1000
    finally:
        del runner._launch_sampling  # the class's method again
        if graphs is not None:
            del graphs.replay
    assert all(t.mm_inputs is None or t.mm_inputs.vision_cache is None for t in treqs), "ViT cache kept"
    out.outputs = {rid: list(req.output_ids) for rid, req in reqs.items()}
    return out


def row_errors(got: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    """(relative norm, largest error / largest reference magnitude) of one logits row."""
    diff = (got - ref).float()
    return (diff.norm() / ref.float().norm()).item(), (diff.abs().max() / ref.float().abs().max()).item()


def check_rows(rows: Dict, got: Dict, rel_tol: float, max_frac: float, mean_tol: float) -> None:
    """Every row of ``got`` against the same key in ``rows`` (the reference)."""
    rels = []
    for key, want in rows.items():
        rel, max_abs = row_errors(got[key], want)
        assert rel < rel_tol and max_abs < max_frac, f"{key}: logits off by {rel:.3g} (norm), {max_abs:.3g} (max)"
        rels.append(rel)
    assert float(np.mean(rels)) < mean_tol, f"mean relative error {np.mean(rels):.3g}"


def compare_runs(ref: Run, forced: Run, free: Run) -> List[Tuple[str, int]]:
    """The checks described in the module docstring; returns the flipped (rid, position)s."""
    assert ref.logits, "no logits recorded: the runner no longer samples through the hooked method"
    assert forced.logits.keys() == ref.logits.keys()
    assert forced.outputs == ref.outputs  # forcing worked: identical batches step by step
    check_rows(ref.logits, forced.logits, REL_TOL, MAX_ABS_FRAC, MEAN_REL_TOL)
    flips = []
    for key, got in forced.logits.items():
        if int(got.argmax()) != ref.outputs[key[0]][key[1]]:
            # A near-tie: the reference's top-2 margin is at most twice this row's largest
            # difference, which check_rows held to tolerance.
            flips.append(key)
    assert len(flips) <= max(1, len(ref.logits) // 5), f"argmax flips at {flips}"
    for rid, want_tokens in ref.outputs.items():
        first = min([pos for r, pos in flips if r == rid], default=len(want_tokens))
        assert free.outputs[rid][:first] == want_tokens[:first], f"request {rid} diverged before any near-tie"
    return flips


# ---------------------------------------------------------------- greedy vs torch_native
@pytest.mark.parametrize("case", ["one-image", "several-images", "mixed-batch"])
def test_greedy_flashinfer_graphs_match_torch_native(case, schedulers, images, request_tokenizer):
    ref_sched, fast_sched = schedulers
    messages, new_tokens, arrivals = case_requests(case, images)
    treqs = [tokenized(request_tokenizer, m, str(i)) for i, m in enumerate(messages)]
    deltas = [t.mm_inputs.mrope_position_delta for t in treqs if t.mm_inputs is not None]
    assert deltas and all(d < 0 for d in deltas)  # images compress positions: the deltas matter
    if case == "several-images":
        grids = treqs[0].mm_inputs.image_grid_thw.tolist()
        assert len(grids) == 4 and len({(h, w) for _, h, w in grids}) == 4
    ref = run(ref_sched, treqs, new_tokens, arrivals)
    forced = run(fast_sched, treqs, new_tokens, arrivals, force=ref)
    free = run(fast_sched, treqs, new_tokens, arrivals)
    # Every decode step replayed a graph; batches holding an image request staged their deltas.
    decode_steps = sum(new_tokens) - len(treqs)
    assert ref.replays == [] and sum(bs for bs, _, _ in forced.replays) == decode_steps
    assert any(with_deltas for _, _, with_deltas in forced.replays)
    if case == "mixed-batch":
        # Padded batches with deltas, the full bucket, and text-only batches after image ones
        # (their deltas must read zero, not the previous batch's).
        assert any(padded > bs and with_deltas for bs, padded, with_deltas in forced.replays)
        assert max(bs for bs, _, _ in forced.replays) == 4
        assert not forced.replays[-1][2] and forced.replays[0][2]
    compare_runs(ref, forced, free)


# ---------------------------------------------------------------- logits vs transformers
@pytest.fixture(scope="module")
def hf_reference(model_dir):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(torch.device(DEVICE)).eval()


def hf_prefill_and_step(reference, treq: TokenizedGenerateReq, next_token: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Last-position logits of the prompt, then of one decode step with ``next_token``."""
    device = reference.device
    ids = torch.tensor([treq.input_ids], device=device)
    kwargs = {"input_ids": ids}
    mm = treq.mm_inputs
    if mm is not None:
        kwargs.update(
            pixel_values=torch.from_numpy(mm.pixel_values).to(device),
            image_grid_thw=torch.from_numpy(mm.image_grid_thw).to(device),
            mm_token_type_ids=(ids == reference.config.image_token_id).int(),
        )
    reference.model.rope_deltas = None  # transformers keeps the last request's delta
    with torch.no_grad():
        out = reference(**kwargs, use_cache=True)
        step = reference(input_ids=torch.tensor([[next_token]], device=device),
                         **cache_kwargs(reference, out), use_cache=True)
    return out.logits[0, -1].float().cpu(), step.logits[0, -1].float().cpu()


def runner_prefill_and_step(runner: ModelRunner, treqs, next_token: int):
    """One EXTEND batch of all requests, then one DECODE step of all with ``next_token``."""
    reqs = []
    for t in treqs:
        req = Req(rid=t.rid, origin_input_ids=t.input_ids, sampling_params=greedy(2), seed=0, mm_inputs=t.mm_inputs)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    lens = [len(t.input_ids) for t in treqs]
    slots = runner.token_to_kv_pool_allocator.alloc(sum(lens))
    batch = ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * len(reqs), lens, slots, [True] * len(reqs))
    prefill = runner.forward(runner.build_forward_batch(batch)).float().cpu()
    offset = 0
    for req, n in zip(reqs, lens):
        req.append_kv_slots(slots[offset : offset + n])
        req.output_ids.append(next_token)
        offset += n
    dslots = runner.token_to_kv_pool_allocator.alloc(len(reqs))
    fb = runner.build_forward_batch(ScheduledBatch(ForwardMode.DECODE, reqs, lens, [1] * len(reqs), dslots,
                                                   [True] * len(reqs)))
    assert fb.mrope_position_deltas is not None
    graphs = runner.cuda_graph_runner
    if graphs is not None:  # the decode step below replays a graph, padded to a captured size
        assert graphs.can_run(fb) and padded_batch_size(len(reqs), graphs.batch_sizes) > len(reqs)
    decode = runner.forward(fb).float().cpu()
    for mm in (t.mm_inputs for t in treqs if t.mm_inputs is not None):
        mm.vision_cache = None
    return prefill, decode


def test_first_decode_step_matches_transformers_fp32(model_dir, images, request_tokenizer, hf_reference):
    _flashinfer()
    messages, _, _ = case_requests("mixed-batch", images)
    # One image, text only, four images: the decode step replays the bs-4 graph with a pad row.
    treqs = [tokenized(request_tokenizer, m, str(i)) for i, m in enumerate(messages[:3])]
    config = _config(model_dir, DEVICE, **FAST)
    runner = ModelRunner(config, load_model_config(config.server, torch.device(DEVICE)), torch.device(DEVICE))
    runner.initialize()
    assert runner.cuda_graph_runner is not None and runner.attn_backend.name == "flashinfer"
    next_token = 42
    prefill, decode = runner_prefill_and_step(runner, treqs, next_token)
    want, got = {}, {}
    for i, t in enumerate(treqs):
        want[(i, "prefill")], want[(i, "decode")] = hf_prefill_and_step(hf_reference, t, next_token)
        got[(i, "prefill")], got[(i, "decode")] = prefill[i], decode[i]
    check_rows(want, got, HF_REL_TOL, HF_MAX_ABS_FRAC, HF_MEAN_REL_TOL)

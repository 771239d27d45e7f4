"""Qwen3-VL against transformers on a tiny random checkpoint (float32, CPU, DeepStack on).

Requests are built by the tokenizer process's own RequestTokenizer (images loaded from files,
transformers' image processor, placeholder expansion, mrope positions), then run in-process
through the Scheduler and ModelRunner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from pymllm.engine.forward_batch import ForwardMode
from pymllm.engine.io_struct import GenerateReqInput, TokenizedGenerateReq
from pymllm.layers.rotary_embedding import MRotaryEmbedding, RotaryEmbedding
from pymllm.multimodal.inputs import mrope_positions
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.testing.tiny_models import tiny_vl_model_dir
from pymllm.tests.helpers import (
    cache_kwargs, greedy, make_scheduler, request_tokenizer_for, write_random_images,
)

# (height, width): wide, tall, tiny (upscaled to the minimum), square, and one past max_pixels.
IMAGE_SIZES = [(30, 50), (100, 20), (5, 7), (40, 40), (90, 70)]


@pytest.fixture(scope="module")
def model_dir():
    return tiny_vl_model_dir()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> List[str]:
    return write_random_images(tmp_path_factory.mktemp("images"), IMAGE_SIZES)


@pytest.fixture(scope="module")
def request_tokenizer(model_dir):
    return request_tokenizer_for(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def chat(*parts) -> List[Dict]:
    content = [{"type": "text", "text": p} if not p.startswith("/") else {"type": "image_url", "image_url": {"url": p}}
               for p in parts]
    return [{"role": "user", "content": content}]


def prompts(images) -> List[List[Dict]]:
    return [
        chat("Describe ", images[0], " briefly."),
        chat("Compare ", images[1], " with ", images[2], " and ", images[3], "."),
        [{"role": "user", "content": "Hello! How are you today?"}],  # text only
        chat(images[4], "What is this?"),
    ]


def tokenized(request_tokenizer, messages, rid: str, n: int) -> TokenizedGenerateReq:
    req = GenerateReqInput(rid=rid, messages=messages, sampling_params={"max_new_tokens": n})
    return request_tokenizer.tokenize(req)


def hf_inputs(treq: TokenizedGenerateReq, image_token_id: int) -> dict:
    ids = torch.tensor([treq.input_ids])
    kwargs = {"input_ids": ids}
    mm = treq.mm_inputs
    if mm is not None:
        kwargs.update(
            pixel_values=torch.from_numpy(mm.pixel_values),
            image_grid_thw=torch.from_numpy(mm.image_grid_thw),
            mm_token_type_ids=(ids == image_token_id).int(),
        )
    return kwargs


def hf_greedy(reference, treq, n: int) -> List[int]:
    """Greedy tokens by full recomputation. (transformers 5.23's generate() gives text-only
    prompts of this model other tokens than its own forward does, so it is not the oracle.)"""
    ids = list(treq.input_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            reference.model.rope_deltas = None
            kwargs = hf_inputs(TokenizedGenerateReq(treq.rid, ids, None, mm_inputs=treq.mm_inputs),
                               reference.config.image_token_id)
            out.append(int(reference(**kwargs).logits[0, -1].argmax()))
            ids.append(out[-1])
    return out


def run(sched, treqs: List[TokenizedGenerateReq], n: int, arrival_steps=None) -> List[List[int]]:
    arrival_steps = arrival_steps or [0] * len(treqs)
    reqs, step, pending = {}, 0, list(range(len(treqs)))
    while pending or sched.has_work():
        for i in [i for i in pending if arrival_steps[i] <= step]:
            pending.remove(i)
            t = treqs[i]
            msg = TokenizedGenerateReq(t.rid, t.input_ids, greedy(n, ignore_eos=True), mm_inputs=t.mm_inputs)
            reqs[i] = sched.add_request(msg)
        sched.step()
        step += 1
        assert step < 2000
    cache = sched.prefix_cache
    assert sched.allocator.used_size() == cache.total_cached() == cache.evictable_size(), "KV slots leaked"
    assert all(t.mm_inputs is None or t.mm_inputs.vision_cache is None for t in treqs), "ViT cache kept"
    return [reqs[i].output_ids for i in range(len(treqs))]


# ---------------------------------------------------------------- pure functions
@pytest.mark.parametrize("grids", [[(1, 4, 6)], [(1, 8, 2), (1, 2, 2), (1, 6, 6)], []])
def test_mrope_positions_match_get_rope_index(reference, grids):
    image_id = reference.config.image_token_id
    ids: List[int] = [5, 6, 7]
    for t, h, w in grids:
        ids += [1409] + [image_id] * (t * h * w // 4) + [1410, 9, 10]
    ids += [11]
    pos, delta = mrope_positions(ids, image_id, np.array(grids, dtype=np.int64).reshape(-1, 3), 2)
    if not grids:
        assert delta == 0 and (pos == np.arange(len(ids))).all()
        return
    ids_t = torch.tensor([ids])
    ref_pos, ref_delta = reference.model.get_rope_index(
        ids_t, (ids_t == image_id).int(), image_grid_thw=torch.tensor(grids)
    )
    np.testing.assert_array_equal(pos, ref_pos[:, 0].numpy())
    assert delta == int(ref_delta)


def test_mrope_rotary_with_equal_axes_is_plain_rope(reference):
    cfg = reference.config.text_config
    mrope = MRotaryEmbedding(32, 64, cfg, [6, 5, 5])
    plain = RotaryEmbedding(32, 64, cfg)
    q, k = torch.randn(10, 4, 32), torch.randn(10, 2, 32)
    pos = torch.arange(3, 13)
    for a, b in zip(mrope(pos.expand(3, -1), q, k), plain(pos, q, k)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        MRotaryEmbedding(32, 64, cfg, [6, 5, 4])


# ---------------------------------------------------------------- model parity
def test_logits_match_transformers(model_dir, images, request_tokenizer, reference):
    """One EXTEND batch mixing image and text-only requests, then decode steps with deltas."""
    treqs = [tokenized(request_tokenizer, m, str(i), 1) for i, m in enumerate(prompts(images))]
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    runner = sched.runner
    reqs = []
    for t in treqs:
        req = Req(rid=t.rid, origin_input_ids=t.input_ids, sampling_params=greedy(1), seed=0, mm_inputs=t.mm_inputs)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    lens = [len(t.input_ids) for t in treqs]
    slots = runner.token_to_kv_pool_allocator.alloc(sum(lens))
    batch = ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * len(reqs), lens, slots, [True] * len(reqs))
    logits = runner.forward(runner.build_forward_batch(batch))
    # Decode one step with a fixed next token, against transformers with a KV cache.
    next_token = 42
    offset = 0
    for req, n in zip(reqs, lens):
        req.kv_slots = slots[offset : offset + n]
        req.output_ids.append(next_token)
        offset += n
    dslots = runner.token_to_kv_pool_allocator.alloc(len(reqs))
    dbatch = ScheduledBatch(ForwardMode.DECODE, reqs, lens, [1] * len(reqs), dslots, [True] * len(reqs))
    fb = runner.build_forward_batch(dbatch)
    assert fb.mrope_position_deltas is not None
    decode_logits = runner.forward(fb)
    with torch.no_grad():
        for i, t in enumerate(treqs):
            reference.model.rope_deltas = None  # transformers keeps the last request's delta
            kwargs = hf_inputs(t, reference.config.image_token_id)
            out = reference(**kwargs, use_cache=True)
            torch.testing.assert_close(logits[i], out.logits[0, -1], rtol=1e-4, atol=1e-4)
            step = reference(input_ids=torch.tensor([[next_token]]), **cache_kwargs(reference, out),
                             use_cache=True)
            torch.testing.assert_close(decode_logits[i], step.logits[0, -1], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def expected(images, request_tokenizer, reference):
    treqs = [tokenized(request_tokenizer, m, str(i), 6) for i, m in enumerate(prompts(images))]
    return treqs, [hf_greedy(reference, t, 6) for t in treqs]


def test_greedy_batched_with_text_requests(model_dir, expected):
    treqs, want = expected
    assert sum(t.mm_inputs is not None for t in treqs) == 3
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    assert run(sched, treqs, 6) == want


def test_greedy_chunked_prefill_staggered(model_dir, expected):
    """Chunks of 16 tokens cut through images; the ViT runs once per request."""
    treqs, want = expected
    sched = make_scheduler(model_dir, max_total_tokens=1024, max_prefill_tokens=16, max_running_requests=2)
    calls = []
    encode = sched.runner.model.encode_images
    sched.runner.model.encode_images = lambda *a: calls.append(1) or encode(*a)
    assert run(sched, treqs, 6, arrival_steps=[0, 1, 3, 5]) == want
    assert len(calls) == 3


def test_prefix_cache_keys_on_image_content(model_dir, images, request_tokenizer, reference):
    """The same image reuses the cached prefix; a different image of the same size does not."""
    from PIL import Image

    other = Path(images[0]).with_name("other.png")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(other)
    first = tokenized(request_tokenizer, chat("Describe ", images[0], " briefly."), "a", 4)
    same = tokenized(request_tokenizer, chat("Describe ", images[0], " briefly. Again."), "b", 4)
    diff = tokenized(request_tokenizer, chat("Describe ", str(other), " briefly."), "c", 4)
    assert same.mm_inputs.image_hashes == first.mm_inputs.image_hashes
    assert diff.mm_inputs.image_hashes != first.mm_inputs.image_hashes
    assert diff.input_ids == first.input_ids  # only the pixels differ
    sched = make_scheduler(model_dir, max_total_tokens=1024)
    outs, cached = [], []
    for t in (first, same, diff):
        before = sched.stats()["num_cached_prompt_tokens"]
        outs.append(run(sched, [t], 4)[0])
        cached.append(sched.stats()["num_cached_prompt_tokens"] - before)
    image_id = first.mm_inputs.image_token_id
    image_start = first.input_ids.index(image_id)
    image_end = len(first.input_ids) - first.input_ids[::-1].index(image_id)
    # "same" reuses the image's KV and beyond; "diff" only the text before its image.
    assert cached[0] == 0 and cached[1] > image_end and cached[2] == image_start
    assert outs == [hf_greedy(reference, t, 4) for t in (first, same, diff)]

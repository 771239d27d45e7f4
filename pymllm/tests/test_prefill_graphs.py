"""Piecewise prefill graphs on CPU: buckets, padding, the pieces between attentions, the order
of a replay, and when the runner uses them.

Capturing and replaying real graphs needs a GPU (test_gpu_prefill_graphs.py). Here a stand-in
graph records its calls, and the pieces run eagerly with the real attention between them, which
checks the staging, the padding and the attention's slices against the plain eager forward.
"""

from __future__ import annotations

import types
from typing import List

import pytest
import torch

from pymllm.configs import ConfigError, GlobalConfig, ServerConfig, parse_config
from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor import prefill_graphs as pg
from pymllm.executor.model_runner import ModelRunner, load_model_runner
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams
from pymllm.testing.tiny_models import tiny_model_dir


# ---------------- buckets ----------------
def test_buckets_step_a_quarter_octave_from_48_and_end_at_the_maximum():
    buckets = pg.prefill_token_buckets(1024)
    assert buckets[:8] == [48, 56, 64, 80, 96, 112, 128, 160]
    assert buckets[-5:] == [512, 640, 768, 896, 1024]
    assert all(b % 8 == 0 for b in buckets)
    # Padding a batch up to its bucket costs at most a quarter of the bucket's work.
    assert all(b / a <= 1.25 for a, b in zip(buckets, buckets[1:]))
    assert pg.prefill_token_buckets(1000)[-2:] == [896, 1000]
    assert pg.prefill_token_buckets(40) == [40]
    assert pg.prefill_token_buckets(0) == []


def test_bucket_for_picks_the_next_bucket():
    buckets = pg.prefill_token_buckets(256)
    assert [pg.bucket_for(n, buckets) for n in (1, 33, 48, 49, 65, 256)] == [48, 48, 48, 56, 80, 256]
    assert pg.bucket_for(257, buckets) is None


def test_flag_parses_and_validates():
    assert parse_config([]).server.prefill_cuda_graph_max_tokens == 1024
    assert parse_config(["--server.prefill_cuda_graph_max_tokens", "0"]).server.prefill_cuda_graph_max_tokens == 0
    cfg = parse_config(["--server.prefill_cuda_graph_max_tokens", "512"])
    assert cfg.server.prefill_cuda_graph_max_tokens == 512
    with pytest.raises(ConfigError, match="--server.prefill_cuda_graph_max_tokens"):
        parse_config(["--server.prefill_cuda_graph_max_tokens", "-1"])


def test_disabled_reasons():
    from pymllm.models.llama import LlamaForCausalLM

    llama = LlamaForCausalLM.__new__(LlamaForCausalLM)

    def reason(device="cuda", model=llama, **server):
        return pg.prefill_graphs_disabled_reason(
            types.SimpleNamespace(server=ServerConfig(**server), device=torch.device(device), model=model)
        )

    assert reason() is None
    assert reason(prefill_cuda_graph_max_tokens=0) == "--server.prefill_cuda_graph_max_tokens 0"
    assert reason(disable_cuda_graph=True) == "--server.disable_cuda_graph"
    assert reason(device="cpu") == "device is cpu"
    assert "has no piecewise prefill" in reason(model=torch.nn.Linear(1, 1))


# ---------------- the pieces on a real (tiny) model ----------------
def _runner(model_dir=None, **server) -> ModelRunner:
    config = GlobalConfig()
    config.server.model_path = str(model_dir or tiny_model_dir("qwen3"))
    config.server.device, config.server.dtype = "cpu", "float32"
    config.server.max_total_tokens, config.server.max_running_requests = 512, 4
    for key, value in server.items():
        setattr(config.server, key, value)
    config.validate()
    return load_model_runner(config)


def _prefill(runner: ModelRunner, lengths: List[int], prefix: List[int] = None, seed: int = 0):
    """A batch extending each request by its length, on top of ``prefix`` cached tokens (already
    in the KV pool from an earlier batch of the same requests when given)."""
    gen = torch.Generator().manual_seed(seed)
    reqs = []
    prefix = prefix or [0] * len(lengths)
    for i, (n, p) in enumerate(zip(lengths, prefix)):
        ids = torch.randint(1, 400, (p + n,), generator=gen).tolist()
        req = Req(rid=str(i), origin_input_ids=ids, sampling_params=SamplingParams(max_new_tokens=1), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        reqs.append(req)
    return reqs


class FakeGraph:
    """Records capture_begin / capture_end / replay into a shared log."""

    log: List[tuple] = []

    def __init__(self):
        self.index = sum(1 for e in FakeGraph.log if e[0] == "begin")

    def capture_begin(self, pool=None):
        FakeGraph.log.append(("begin", self.index, pool))

    def capture_end(self):
        FakeGraph.log.append(("end", self.index))

    def replay(self):
        FakeGraph.log.append(("replay", self.index))


def _graphs(runner: ModelRunner, buckets) -> pg.PrefillGraphs:
    FakeGraph.log = []
    graphs = pg.PrefillGraphs(runner.model, runner.kv_pool, buckets, runner.device, graph_factory=FakeGraph)
    graphs.capture()
    return graphs


def _pieces_with_real_attention(runner: ModelRunner, graphs: pg.PrefillGraphs, fb, bucket: int) -> torch.Tensor:
    """What a replay computes, without graphs: the pieces over the padded static rows with the
    batch's real attention between them, on the real rows only."""
    n = fb.input_ids.shape[0]
    s = graphs.statics
    s.stage(fb, bucket)
    backend = runner.attn_backend
    backend.init_forward_metadata(fb)

    def attend(layer, save_kv_cache):
        out = backend.forward(s.q[:n], s.k[:n], s.v[:n], layer, fb, save_kv_cache=save_kv_cache)
        s.attn_out[:n].copy_(out.reshape(n, -1))

    with torch.inference_mode():
        return runner.model.logits(graphs.run_pieces(bucket, attend)[:n], fb)


def _eager(runner: ModelRunner, fb) -> torch.Tensor:
    runner.attn_backend.init_forward_metadata(fb)
    with torch.inference_mode():
        return runner.model(fb.input_ids, fb.positions, fb)


@pytest.mark.parametrize("lengths, prefix", [([40], None), ([20, 7, 30], None), ([25, 30], [17, 9])])
def test_pieces_between_attentions_equal_the_eager_forward(lengths, prefix):
    """Padded to the bucket, the pieces with the real attention on the real rows give the eager
    forward's logits and KV entries; padding rows write nothing but slot 0."""
    runner = _runner()
    graphs = _graphs(runner, [48, 64, 96])
    reqs = _prefill(runner, lengths, prefix)
    alloc = runner.token_to_kv_pool_allocator.alloc
    n_reqs = len(reqs)
    if prefix:  # the prefix goes through the plain eager forward first
        runner.forward(runner.build_forward_batch(
            ScheduledBatch(ForwardMode.EXTEND, reqs, [0] * n_reqs, prefix, alloc(sum(prefix)), [False] * n_reqs)))
    starts = prefix or [0] * n_reqs
    slots = alloc(sum(lengths))
    batch = ScheduledBatch(ForwardMode.EXTEND, reqs, starts, lengths, slots, [True] * n_reqs)
    fb = runner.build_forward_batch(batch)
    bucket = graphs.bucket_of(fb)
    assert bucket == pg.bucket_for(sum(lengths), [48, 64, 96])
    k_pool, v_pool = runner.kv_pool.get_kv_buffer(0)
    ref = _eager(runner, fb)
    kv_ref = (k_pool.clone(), v_pool.clone())
    k_pool[torch.as_tensor(slots)] = float("nan")  # the pieces must write these again
    got = _pieces_with_real_attention(runner, graphs, fb, bucket)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    others = torch.ones(k_pool.shape[0], dtype=torch.bool)
    others[0] = False  # padding rows store their K/V in slot 0
    torch.testing.assert_close(k_pool[others], kv_ref[0][others])
    torch.testing.assert_close(v_pool[others], kv_ref[1][others])


def test_qwen3_vl_text_prompt_through_the_pieces():
    """Qwen3-VL's language model: a text-only prefill goes through the pieces like any other."""
    from pymllm.testing.tiny_models import tiny_vl_model_dir

    runner = _runner(tiny_vl_model_dir())
    assert pg.prefill_graphs_disabled_reason(types.SimpleNamespace(
        server=ServerConfig(), device=torch.device("cuda"), model=runner.model)) is None
    graphs = _graphs(runner, [48, 64])
    reqs = _prefill(runner, [45])
    fb = runner.build_forward_batch(ScheduledBatch(
        ForwardMode.EXTEND, reqs, [0], [45], runner.token_to_kv_pool_allocator.alloc(45), [True]))
    assert graphs.bucket_of(fb) == 48
    ref = _eager(runner, fb)
    torch.testing.assert_close(_pieces_with_real_attention(runner, graphs, fb, 48), ref, rtol=1e-5, atol=1e-5)
    fb.extras["mm"] = object()  # a batch with images prefills eagerly
    assert graphs.bucket_of(fb) is None


def test_capture_makes_one_piece_per_attention_plus_one_and_replays_in_order():
    runner = _runner()
    layers = runner.model_config.num_layers
    graphs = _graphs(runner, [48, 64])
    # Largest bucket first; every graph begun, then ended, before the next begins.
    assert [b for b in graphs.captured] == [64, 48]
    assert [e[0] for e in FakeGraph.log] == ["begin", "end"] * (2 * (layers + 1))
    for bucket in (48, 64):
        entry = graphs.captured[bucket]
        assert len(entry.graphs) == layers + 1
        assert [layer.layer_id for layer, _ in entry.attentions] == list(range(layers))
        assert entry.hidden.shape == (bucket, runner.model_config.hf_config.hidden_size)

    calls = []

    class RecordingBackend:
        def forward(self, q, k, v, layer, fb, save_kv_cache=True):
            calls.append((layer.layer_id, q.shape[0], k.shape[0], v.shape[0], save_kv_cache))
            FakeGraph.log.append(("attention", layer.layer_id))
            return torch.full((q.shape[0], q.shape[1]), float(layer.layer_id))

    reqs = _prefill(runner, [50])
    fb = runner.build_forward_batch(ScheduledBatch(
        ForwardMode.EXTEND, reqs, [0], [50], runner.token_to_kv_pool_allocator.alloc(50), [True]))
    fb.attn_backend = RecordingBackend()
    FakeGraph.log = []
    entry = graphs.captured[64]
    out = graphs.run(fb, 64)
    first = entry.graphs[0].index
    expected = []
    for i in range(layers):
        expected += [("replay", first + i), ("attention", i)]
    assert FakeGraph.log == expected + [("replay", first + layers)]
    save = [s for _, s in entry.attentions]
    assert calls == [(i, 50, 50, 50, save[i]) for i in range(layers)]
    # The last attention's output sits in the real rows; the padding rows keep their zeros.
    s = graphs.statics
    assert s.attn_out[:50].eq(layers - 1).all() and s.attn_out[50:64].eq(0).all()
    assert out.shape[0] == 50 and out.data_ptr() == entry.hidden.data_ptr()


def test_stage_pads_with_token_position_and_slot_zero():
    statics = pg.StaticPrefillInputs.allocate(64, torch.device("cpu"))

    def fb(n, base):
        ids = torch.arange(base, base + n)
        return types.SimpleNamespace(input_ids=ids, positions=ids + 1, out_cache_loc=ids + 2)

    statics.stage(fb(60, 100), 64)
    statics.stage(fb(50, 200), 64)  # shorter: rows 50..63 must not keep the first batch's values
    for buf, offset in ((statics.input_ids, 0), (statics.positions, 1), (statics.out_cache_loc, 2)):
        assert torch.equal(buf[:50], torch.arange(200, 250) + offset)
        assert buf[50:].eq(0).all()


def test_bucket_of_leaves_decode_images_and_long_batches_eager():
    runner = _runner()
    graphs = _graphs(runner, [48, 64])

    def batch(n, mode=ForwardMode.EXTEND, positions_dim=1):
        ids = torch.zeros(n, dtype=torch.int64)
        pos = ids if positions_dim == 1 else torch.zeros(3, n, dtype=torch.int64)
        return types.SimpleNamespace(forward_mode=mode, input_ids=ids, positions=pos, extras={})

    assert graphs.bucket_of(batch(33)) == 48
    assert graphs.bucket_of(batch(64, ForwardMode.MIXED)) == 64
    assert graphs.bucket_of(batch(65)) is None
    assert graphs.bucket_of(batch(40, ForwardMode.DECODE)) is None
    assert graphs.bucket_of(batch(40, positions_dim=3)) is None


def test_runner_takes_the_pieces_for_a_bucketed_prefill():
    """ModelRunner's eager forward hands a bucketed batch to the graphs and applies the LM head
    to their hidden states; other batches run the model."""
    runner = _runner()
    reqs = _prefill(runner, [40])
    fb = runner.build_forward_batch(ScheduledBatch(
        ForwardMode.EXTEND, reqs, [0], [40], runner.token_to_kv_pool_allocator.alloc(40), [True]))
    eager = runner.forward(fb)
    assert runner.prefill_graphs is None  # CPU: prefill stays eager

    class Stub:
        def __init__(self, bucket):
            self.bucket, self.runs = bucket, []

        def bucket_of(self, fb):
            return self.bucket

        def run(self, fb, bucket):
            self.runs.append(bucket)
            with torch.inference_mode():
                return runner.model.model(fb.input_ids, fb.positions, fb)

    runner.prefill_graphs = Stub(48)
    torch.testing.assert_close(runner.forward(fb), eager)
    assert runner.prefill_graphs.runs == [48]
    runner.prefill_graphs = Stub(None)
    torch.testing.assert_close(runner.forward(fb), eager)
    assert runner.prefill_graphs.runs == []

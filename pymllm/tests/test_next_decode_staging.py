"""Staging a decode step from words packed while the previous step ran (CudaGraphRunner.
predict_next / stage_next), on CPU with the graph runner's host path (FlashInfer stand-in).

Oracle: the full staging path (host_batch → GraphPacker.pack → upload) of the same batch. The
predicted path must leave the graph's static inputs exactly as the full path would, and must step
aside whenever the batch is not the predicted one (other requests, other order, other positions,
an extend in between).
"""

from __future__ import annotations

import pytest
import torch

from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor.batch_inputs import host_batch, next_decode_host_batch
from pymllm.executor.cuda_graph_runner import CudaGraphRunner, padded_batch_size
from pymllm.layers.attention import flashinfer_backend as fib
from pymllm.layers.attention.torch_native_backend import TorchNativeAttnBackend
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.testing.tiny_models import tiny_model_dir
from pymllm.tests.helpers import greedy
from pymllm.tests.test_flashinfer_metadata import _runner, fake_flashinfer  # noqa: F401 (fixture)


class StandInGraph:
    """A captured graph on CPU: replay records itself in ``events`` (with the static input tokens
    it reads when ``record_inputs``) and ends as a real graph does, with the argmax tail
    (``CudaGraphRunner.argmax_tail``: the graph's outputs, the fed input tokens, the Readback row)
    of logits whose argmax is the next of the ids queued by ``will_sample`` (zeros when none)."""

    def __init__(self, events: list, graphs, bs: int):
        self.events, self.graphs, self.bs = events, graphs, bs
        self.record_inputs = False
        self.queued: list = []

    def will_sample(self, *steps) -> None:
        self.queued.extend(steps)

    def replay(self):
        g = self.graphs
        self.words_read = g.inputs.words.clone()
        self.events.append(("launch", self.bs, g.inputs.input_ids[: self.bs].tolist()) if self.record_inputs
                           else ("launch", self.bs))
        ids = self.queued.pop(0) if self.queued else [0] * self.bs
        raw = torch.zeros(self.bs, 64)
        raw[torch.arange(self.bs), torch.tensor(ids)] = 1.0
        logits, argmax = g.argmax_tail(raw, self.bs)
        out_logits, out_ids = g.outputs[self.bs]
        out_logits.copy_(logits[:, : out_logits.shape[1]])
        out_ids.copy_(argmax)


def _setup(events=None):
    """A graph runner over a tiny Qwen3 with stand-in graphs (the backend's graph-mode state as
    capture leaves it); ``events`` collects their launches."""
    runner = _runner(tiny_model_dir("qwen3"))
    runner.attn_backend = fib.FlashInferAttnBackend(runner)
    graphs = CudaGraphRunner(runner)
    runner.cuda_graph_runner = graphs
    events = [] if events is None else events
    for bs in graphs.batch_sizes:
        graphs.prepare_capture(bs)
        graphs.graphs[bs] = StandInGraph(events, graphs, bs)
        graphs.outputs[bs] = (torch.zeros(bs, 8), torch.zeros(bs, dtype=torch.int64))
    reqs = []
    for i, n in enumerate((5, 9, 3)):
        req = Req(rid=str(i), origin_input_ids=list(range(10, 10 + n)), sampling_params=greedy(50), seed=0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        req.output_ids.append(100 + i)
        reqs.append(req)
    return runner, graphs, reqs


def _decode(runner, reqs) -> ScheduledBatch:
    slots = runner.token_to_kv_pool_allocator.alloc(len(reqs))
    return ScheduledBatch(ForwardMode.DECODE, reqs, [len(r.fill_ids) - 1 for r in reqs], [1] * len(reqs), slots,
                          [True] * len(reqs))


def _full_words(runner, graphs, batch) -> torch.Tensor:
    """The static inputs the full staging path writes for ``batch`` (packed, device part), but
    for the Readback row each staging reserves anew (``_staged_words`` leaves it out too)."""
    hb = host_batch(batch, runner.req_to_token_pool.max_context_len)
    words = graphs._packer.pack(hb, padded_batch_size(hb.batch_size, graphs.batch_sizes))
    return torch.from_numpy(words[: graphs.inputs.layout.device_words].copy())


def _staged_words(graphs) -> torch.Tensor:
    """The static inputs of the staged step (as its graph read them, where it was launched at
    staging) with the Readback row word zeroed, after checking that it names the row the step
    reserved (never the scratch row, which a decode step does not read)."""
    staged = graphs._staged
    words = (graphs.graphs[staged.padded_bs].words_read if staged.launched else graphs.inputs.words).clone()
    offset = graphs.inputs.layout.segments["readback_slot"].offset
    assert int(words[offset]) == staged.readback_slot and staged.readback_slot != 0
    words[offset] = 0
    return words


def _spy_on_stage_next(graphs) -> list:
    """Whether each build took the predicted words."""
    used, stage_next = [], graphs.stage_next

    def spy(batch, device_tokens=None):
        fb = stage_next(batch, device_tokens)
        used.append(fb is not None)
        return fb

    graphs.stage_next = spy
    return used


def test_next_decode_host_batch_is_one_token_further(fake_flashinfer):  # noqa: F811
    runner, graphs, reqs = _setup()
    hb = host_batch(_decode(runner, reqs), runner.req_to_token_pool.max_context_len)
    nxt = next_decode_host_batch(hb)
    assert (nxt.positions == hb.positions + 1).all() and (nxt.seq_lens == hb.seq_lens + 1).all()
    assert (nxt.kv_write_index == hb.kv_write_index + 1).all()
    assert (nxt.req_pool_indices == hb.req_pool_indices).all()
    assert not nxt.input_ids.any() and not nxt.out_cache_loc.any() and not nxt.kv_write_loc.any()


def test_predicted_staging_equals_full_staging(fake_flashinfer):  # noqa: F811
    runner, graphs, reqs = _setup()
    used = _spy_on_stage_next(graphs)
    # The same three requests go on (predicted), one finishes (not), the other two go on
    # (predicted), their order changes (not), then that order goes on (predicted).
    plans = [reqs, reqs, reqs, reqs[:2], reqs[:2], reqs[:2], [reqs[1], reqs[0]], [reqs[1], reqs[0]]]
    for step, batch_reqs in enumerate(plans):
        batch = _decode(runner, batch_reqs)
        want = _full_words(runner, graphs, batch)
        fb = runner.build_forward_batch(batch)
        assert torch.equal(_staged_words(graphs), want), step
        assert fb.batch_size == len(batch_reqs) and fb.seq_lens_cpu == [len(r.fill_ids) for r in batch_reqs]
        graphs.predict_next()  # what replay() does right after the graph launch
        for i, r in enumerate(batch_reqs):
            r.output_ids.append(1000 + 10 * step + i)
    assert used == [False, True, True, False, True, True, False, True]


def test_a_batch_in_between_ends_the_prediction(fake_flashinfer):  # noqa: F811
    runner, graphs, reqs = _setup()
    runner.build_forward_batch(_decode(runner, reqs))
    graphs.predict_next()
    assert graphs._next is not None
    new = Req(rid="x", origin_input_ids=[7, 8, 9], sampling_params=greedy(5), seed=0)
    new.req_pool_idx = runner.req_to_token_pool.alloc()
    slots = runner.token_to_kv_pool_allocator.alloc(3)
    runner.build_forward_batch(ScheduledBatch(ForwardMode.EXTEND, [new], [0], [3], slots, [True]))
    assert graphs._next is None
    for r in reqs:
        r.output_ids.append(1)
    used = _spy_on_stage_next(graphs)
    batch = _decode(runner, reqs)
    want = _full_words(runner, graphs, batch)
    runner.build_forward_batch(batch)
    assert used == [False] and torch.equal(_staged_words(graphs), want)


def test_replay_packs_the_next_step_after_the_launch(fake_flashinfer):  # noqa: F811
    """CudaGraphRunner.replay launches the graph, then predicts (stand-in graphs on CPU)."""
    order = []
    runner, graphs, reqs = _setup(order)
    predict = graphs.predict_next
    graphs.predict_next = lambda: (order.append("predict"), predict())
    fb = runner.build_forward_batch(_decode(runner, reqs))
    assert order == []  # a step that was not predicted launches at its forward
    graphs.replay(fb)
    assert order == [("launch", 4), "predict"] and graphs._next is not None
    assert graphs._next.rows == [r.req_pool_idx for r in reqs]
    assert graphs._next.positions == [len(r.fill_ids) for r in reqs]


def test_a_predicted_step_launches_when_it_is_staged(fake_flashinfer):  # noqa: F811
    """The predicted step's graph runs before its ForwardBatch exists; its forward returns that
    run's outputs without a second launch."""
    events = []
    runner, graphs, reqs = _setup(events)
    built = graphs._static_batch
    graphs._static_batch = lambda *a, **k: (events.append("batch object"), built(*a, **k))[1]
    runner.forward(runner.build_forward_batch(_decode(runner, reqs)))
    for r in reqs:
        r.output_ids.append(7)
    events.clear()
    fb = runner.build_forward_batch(_decode(runner, reqs))
    assert events == [("launch", 4), "batch object"]
    assert graphs._next is not None  # the step after it, packed while it runs
    logits = runner.forward(fb)
    assert events == [("launch", 4), "batch object"] and logits.shape == (3, 8)


def test_greedy_sampling_of_a_replay_reads_the_graphs_argmax(fake_flashinfer):  # noqa: F811
    """The graph ends with the argmax; greedy sampling returns its rows (here written by hand:
    the stand-in graph runs nothing), not an argmax of its own."""
    runner, graphs, reqs = _setup()
    batch = _decode(runner, reqs)
    graphs.graphs[4].will_sample([11, 12, 13, 14])  # row 3 is padding
    logits = runner.forward(runner.build_forward_batch(batch))
    slot = graphs.last_readback_slot
    assert slot not in (None, 0) and runner.readback.ring[slot, :4].tolist() == [11, 12, 13, 14]
    assert runner.sample(logits, batch).next_token_ids == [11, 12, 13]


def _launch_recording_input_ids(graphs):
    for bs in graphs.batch_sizes:
        graphs.graphs[bs].record_inputs = True


def test_a_follower_takes_its_tokens_from_the_device(fake_flashinfer):  # noqa: F811
    """A step launched behind one in flight (launch_batch(follows=...)) reads the ids that step
    sampled on the device, through the predicted staging and through the full one, and samples
    with the step counter one further (the in-flight token is not in output_ids yet). The ids
    reach its input tokens from the argmax of the step before (fed: no upload of the tokens) and
    the host from that argmax's Readback row (no copy)."""
    events = []
    runner, graphs, reqs = _setup(events)
    _launch_recording_input_ids(graphs)
    graphs.graphs[4].will_sample([21, 22, 23, 0], [31, 32, 33, 0], [41, 42, 43, 0])
    first = runner.launch_batch(_decode(runner, reqs))
    assert events == [("launch", 4, [100, 101, 102, 0])]
    follower = _decode(runner, reqs)
    follower.prefix_lens = [p + 1 for p in follower.prefix_lens]
    second = runner.launch_batch(follower, follows=first)  # predicted: staged and launched at once
    assert events[-1] == ("launch", 4, [21, 22, 23, 0])
    assert runner.collect(first).next_token_ids == [21, 22, 23]
    for r, t in zip(reqs, (21, 22, 23)):
        r.output_ids.append(t)
    graphs._next = None  # the full staging path this time
    third = _decode(runner, reqs)
    third.prefix_lens = [p + 1 for p in third.prefix_lens]
    third_pending = runner.launch_batch(third, follows=second)
    assert events[-1] == ("launch", 4, [31, 32, 33, 0])
    assert runner.collect(second).next_token_ids == [31, 32, 33]
    assert runner.collect(third_pending).next_token_ids == [41, 42, 43]


def test_tokens_are_fed_only_by_the_graph_that_ran_last(fake_flashinfer):  # noqa: F811
    """The upload leaves the input tokens out only when they are the ids of the last replay, of
    the same graph, with no upload since: otherwise it writes them and the device tokens are
    copied in before the launch, as before."""
    events = []
    runner, graphs, reqs = _setup(events)
    _launch_recording_input_ids(graphs)
    graphs.graphs[4].will_sample([21, 22, 23, 0])
    first = runner.launch_batch(_decode(runner, reqs))
    ids = first.device_ids
    assert graphs.tokens_fed(4, False, ids)
    assert not graphs.tokens_fed(4, True, ids) and not graphs.tokens_fed(8, False, ids)
    assert not graphs.tokens_fed(4, False, ids.clone()) and not graphs.tokens_fed(4, False, None)
    # An extend staged in between (an upload of all words): the next follower's tokens are copied.
    new = Req(rid="x", origin_input_ids=[7, 8, 9], sampling_params=greedy(5), seed=0)
    new.req_pool_idx = runner.req_to_token_pool.alloc()
    graphs.stage(host_batch(ScheduledBatch(ForwardMode.EXTEND, [new], [0], [3],
                                           runner.token_to_kv_pool_allocator.alloc(3), [True]),
                            runner.req_to_token_pool.max_context_len))
    assert not graphs.tokens_fed(4, False, ids)
    graphs.inputs.input_ids.fill_(-1)
    follower = _decode(runner, reqs)
    follower.prefix_lens = [p + 1 for p in follower.prefix_lens]
    graphs._next = None
    runner.launch_batch(follower, follows=first)
    assert events[-1] == ("launch", 4, [21, 22, 23, 0])


def test_a_follower_must_decode_the_same_requests(fake_flashinfer):  # noqa: F811
    runner, graphs, reqs = _setup()
    first = runner.launch_batch(_decode(runner, reqs))
    with pytest.raises(ValueError, match="same requests"):
        runner.launch_batch(_decode(runner, reqs[:2]), follows=first)


class GraphBody:
    """A "graph" on CPU that runs what the captured graph runs (``CudaGraphRunner.run_static``) into
    the graph's outputs: the real model, its argmax tail included."""

    def __init__(self, graphs, bs: int):
        self.graphs, self.bs = graphs, bs

    def replay(self):
        with torch.inference_mode():
            logits, ids = self.graphs.run_static(self.bs)
        out_logits, out_ids = self.graphs.outputs[self.bs]
        out_logits.copy_(logits)
        out_ids.copy_(ids)


def test_steps_through_the_graph_body_match_the_eager_forward(fake_flashinfer):  # noqa: F811
    """Decode steps through the graph's own body (predicted ones launched when staged): each step
    samples its argmax, hands it to the host through its Readback row and into the static input
    tokens, and its logits equal the eager forward on the step's own tokens (given back to the
    static buffer: the argmax fed the next step's over them)."""
    from pymllm.tests.test_flashinfer_metadata import _forward_with

    runner, graphs, reqs = _setup()
    vocab = runner.model_config.vocab_size
    for bs in graphs.batch_sizes:
        graphs.graphs[bs] = GraphBody(graphs, bs)
        graphs.outputs[bs] = (torch.zeros(bs, vocab), torch.zeros(bs, dtype=torch.int64))
    native = TorchNativeAttnBackend()
    predicted = _spy_on_stage_next(graphs)
    for step in range(3):
        batch = _decode(runner, reqs)
        fb = runner.build_forward_batch(batch)
        logits = runner.forward(fb).clone()
        sampled = runner.sample(logits, batch).next_token_ids
        assert sampled == logits.argmax(-1).tolist()
        slot = graphs.last_readback_slot
        assert runner.readback.ring[slot, :3].tolist() == sampled
        assert fb.input_ids.tolist() == sampled
        fb.input_ids.copy_(torch.tensor([r.output_ids[-1] for r in reqs]))
        ref = _forward_with(runner, native, fb)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        for r, t in zip(reqs, sampled):
            r.output_ids.append(t)
    assert predicted == [False, True, True]

"""Host-side packing of batch inputs (pure numpy) and the one-copy stager on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pymllm.engine.forward_batch import ForwardMode
from pymllm.executor import batch_inputs as bi
from pymllm.executor.graph_inputs import GraphInputs
from pymllm.orchestrator.request import Req
from pymllm.orchestrator.schedule_batch import ScheduledBatch
from pymllm.sampling_params import SamplingParams

STRIDE = 100  # req_to_token row length


def test_decode_batch_writes_one_entry_per_request():
    hb = bi.decode_host_batch([7, 8], [4, 9], [2, 0], np.array([31, 32]), STRIDE)
    assert hb.input_ids.tolist() == [7, 8] and hb.positions.tolist() == [4, 9]
    assert hb.seq_lens.tolist() == [5, 10] and hb.req_pool_indices.tolist() == [2, 0]
    assert hb.kv_write_index.tolist() == [2 * STRIDE + 4, 9]
    assert hb.kv_write_loc.tolist() == [31, 32]
    assert hb.extend_seq_lens is None


def test_extend_batch_positions_and_cached_prefix_writes():
    hb = bi.extend_host_batch(
        [[5, 6, 7], [9, 10]], [0, 4], [1, 3], np.array([11, 12, 13, 14, 15]), STRIDE,
        cached_prefixes=[(3, np.array([40, 41, 42, 43]))],
    )
    assert hb.input_ids.tolist() == [5, 6, 7, 9, 10]
    assert hb.positions.tolist() == [0, 1, 2, 4, 5]
    assert hb.seq_lens.tolist() == [3, 6]
    assert hb.extend_seq_lens.tolist() == [3, 2] and hb.extend_prefix_lens.tolist() == [0, 4]
    rows = [STRIDE + 0, STRIDE + 1, STRIDE + 2, 3 * STRIDE + 4, 3 * STRIDE + 5]
    assert hb.kv_write_index.tolist() == rows + [3 * STRIDE + j for j in range(4)]
    assert hb.kv_write_loc.tolist() == [11, 12, 13, 14, 15, 40, 41, 42, 43]


def _req(rid: str, prompt, output=(), row=0) -> Req:
    req = Req(rid=rid, origin_input_ids=list(prompt), sampling_params=SamplingParams().with_defaults({}), seed=0)
    req.output_ids = list(output)
    req.req_pool_idx = row
    return req


def test_host_batch_reads_scheduled_batches():
    a, b = _req("a", [1, 2, 3, 4], row=0), _req("b", [5, 6, 7], row=1)
    # b reuses 2 cached slots (first extend on top of the prefix cache); a is a later chunk.
    b.kv_slots, b.cache_owned_len = np.array([50, 51]), 2
    a.kv_slots, a.cache_owned_len = np.array([60, 61]), 0
    batch = ScheduledBatch(ForwardMode.EXTEND, [a, b], [2, 2], [2, 1], np.array([70, 71, 72]), [True, True])
    hb = bi.host_batch(batch, STRIDE)
    assert hb.input_ids.tolist() == [3, 4, 7] and hb.positions.tolist() == [2, 3, 2]
    assert hb.kv_write_index.tolist() == [2, 3, STRIDE + 2, STRIDE + 0, STRIDE + 1]
    assert hb.kv_write_loc.tolist() == [70, 71, 72, 50, 51]
    a.output_ids, b.output_ids = [9], [8]
    decode = ScheduledBatch(ForwardMode.DECODE, [a, b], [4, 3], [1, 1], np.array([80, 81]), [True, True])
    hb = bi.host_batch(decode, STRIDE)
    assert hb.input_ids.tolist() == [9, 8] and hb.seq_lens.tolist() == [5, 4]


def test_layout_segments_are_aligned_and_views_round_trip():
    layout = bi.PackedLayout([("a", 3, np.int64), ("b", 3, np.int32), ("c", 1, np.int64)],
                             host_only=[("h", 5, np.int32)])
    offsets = [s.offset for s in layout.segments.values()]
    assert offsets == [0, 4, 6, 8] and all(o % 2 == 0 for o in offsets), "16-byte aligned"
    assert layout.device_words == 8 and layout.total_words == 12
    words = layout.pack({"a": np.array([1, -2, 3]), "b": np.array([4, 5]), "c": np.array([6]),
                         "h": np.array([7, 8, 9, 10, 11])})
    views = layout.numpy_views(words)
    assert views["b"].dtype == np.int32 and views["b"].tolist() == [4, 5, 0]
    t = torch.from_numpy(words)
    device = layout.torch_views(t)
    assert set(device) == {"a", "b", "c"} and device["b"].dtype == torch.int32
    assert device["a"].tolist() == [1, -2, 3] and device["c"].tolist() == [6]
    host = layout.torch_views(t, host_only=True)
    assert set(host) == {"h"} and host["h"].tolist() == [7, 8, 9, 10, 11]


def test_eager_pack_holds_every_field():
    hb = bi.extend_host_batch([[5, 6, 7], [9]], [0, 2], [1, 3], np.array([11, 12, 13, 14]), STRIDE)
    layout, words = bi.pack_eager(hb)
    assert layout.device_words == layout.total_words == len(words)
    views = layout.torch_views(torch.from_numpy(words))
    for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "kv_write_index"):
        assert views[name].dtype == torch.int64 and views[name].tolist() == getattr(hb, name).tolist()
    for name in ("seq_lens", "kv_write_loc", "extend_seq_lens", "extend_prefix_lens"):
        assert views[name].dtype == torch.int32 and views[name].tolist() == getattr(hb, name).tolist()


def test_graph_pack_pads_with_reserved_rows_and_has_host_indptr():
    layout = bi.graph_layout(8)
    hb = bi.decode_host_batch([7, 8, 9], [4, 5, 6], [0, 1, 2], [31, 32, 33], STRIDE)
    t = torch.from_numpy(bi.pack_graph(hb, layout, 4, padding_row=9, row_stride=STRIDE))
    views = layout.torch_views(t)
    assert views["input_ids"][:4].tolist() == [7, 8, 9, 0]
    assert views["positions"][:4].tolist() == [4, 5, 6, 0]
    assert views["out_cache_loc"][:4].tolist() == [31, 32, 33, 0]
    assert views["req_pool_indices"][:4].tolist() == [0, 1, 2, 9]
    assert views["seq_lens"][:4].tolist() == [5, 6, 7, 1] and views["seq_lens"].dtype == torch.int32
    assert views["mrope_position_deltas"][:4].tolist() == [0, 0, 0, 0]
    # The real rows' req_to_token writes; the padding row's puts slot 0 at its position 0,
    # which keeps that row all-zero.
    assert views["kv_write_index"][:4].tolist() == [4, STRIDE + 5, 2 * STRIDE + 6, 9 * STRIDE]
    assert views["kv_write_loc"][:4].tolist() == [31, 32, 33, 0]
    host = layout.torch_views(t, host_only=True)
    assert set(host) == {"kv_indptr", "seq_lens_host"}
    assert host["kv_indptr"][:5].tolist() == [0, 5, 11, 18, 19] and host["kv_indptr"].dtype == torch.int32
    assert host["seq_lens_host"][:4].tolist() == [5, 6, 7, 1]
    # The layout depends on max_bs alone: captured graphs keep reading the same addresses.
    assert bi.graph_layout(8).segments == layout.segments
    with pytest.raises(ValueError):
        bi.pack_graph(hb, layout, 2, padding_row=9, row_stride=STRIDE)


def test_stager_on_cpu_returns_the_packed_words():
    stager = bi.InputStager(torch.device("cpu"))
    words = np.arange(6, dtype=np.int64)
    host, dev = stager.upload(words, 6)
    assert host is dev and dev.tolist() == list(range(6))


def test_graph_inputs_start_as_padding_and_share_one_buffer():
    inputs = GraphInputs.allocate(8, torch.device("cpu"), padding_row=9, row_stride=STRIDE)
    assert inputs.req_pool_indices.tolist() == [9] * 8 and inputs.seq_lens.tolist() == [1] * 8
    assert inputs.seq_lens.dtype == torch.int32 and inputs.kv_write_loc.dtype == torch.int32
    assert inputs.input_ids.tolist() == [0] * 8 and inputs.mrope_position_deltas.tolist() == [0] * 8
    assert inputs.kv_write_index.tolist() == [9 * STRIDE] * 8 and inputs.kv_write_loc.tolist() == [0] * 8
    base = inputs.words.data_ptr()
    span = inputs.words.numel() * 8
    for t in (inputs.input_ids, inputs.positions, inputs.seq_lens, inputs.kv_write_index):
        assert base <= t.data_ptr() < base + span


def test_mrope_deltas_travel_with_the_batch():
    hb = bi.decode_host_batch([7, 8], [4, 9], [2, 0], np.array([31, 32]), STRIDE)
    assert "mrope_position_deltas" not in bi.eager_layout(hb).segments
    hb.mrope_position_deltas = np.array([-3, 5])
    layout, words = bi.pack_eager(hb)
    assert layout.torch_views(torch.from_numpy(words))["mrope_position_deltas"].tolist() == [-3, 5]
    words = bi.pack_graph(hb, bi.graph_layout(4), 4, padding_row=9, row_stride=STRIDE)
    assert bi.graph_layout(4).torch_views(torch.from_numpy(words))["mrope_position_deltas"].tolist() == [-3, 5, 0, 0]


def test_graph_packer_reuses_one_array_without_stale_rows():
    layout = bi.graph_layout(8)
    packer = bi.GraphPacker(layout, padding_row=9, row_stride=STRIDE)
    big = bi.decode_host_batch([7, 8, 9, 10, 11], [4, 5, 6, 7, 8], [0, 1, 2, 3, 4], [31, 32, 33, 34, 35], STRIDE)
    small = bi.decode_host_batch([7], [4], [0], [31], STRIDE)
    first = packer.pack(big, 8)
    assert np.array_equal(first, bi.pack_graph(big, layout, 8, 9, STRIDE))
    again = packer.pack(small, 2)
    assert again is first, "one array, rewritten"
    assert np.array_equal(again, bi.pack_graph(small, layout, 2, 9, STRIDE))


def test_view_cache_makes_each_view_once_and_starts_over_past_its_limit():
    from pymllm.executor.batch_inputs import ViewCache

    made = []
    cache = ViewCache(limit=2)

    def make(n):
        made.append(n)
        return torch.arange(10)[:n]

    first = cache.get(("a", 3), lambda: make(3))
    assert cache.get(("a", 3), lambda: make(3)) is first and made == [3]
    cache.get(("a", 4), lambda: make(4))
    cache.get(("a", 5), lambda: make(5))  # third key: the cache starts over
    assert cache.get(("a", 3), lambda: make(3)) is not first and made == [3, 4, 5, 3]
    cache.clear()
    cache.get(("a", 3), lambda: make(3))
    assert made == [3, 4, 5, 3, 3]


def test_static_words_upload_copies_the_device_part_and_keeps_the_host_words() -> None:
    from pymllm.executor.batch_inputs import StaticWordsUpload

    device_words = torch.full((6,), -1, dtype=torch.int64)
    up = StaticWordsUpload(device_words, total_words=9, stream=lambda: None)
    for step in range(2):
        words = np.arange(9, dtype=np.int64) + 100 * step
        host = up.upload(words)
        up.seal()  # nothing to record on CPU
        assert device_words.tolist() == words[:6].tolist()
        assert host.tolist() == words.tolist() and host is up.host


def test_static_words_upload_can_leave_the_first_words_alone() -> None:
    """keep_tokens: the device's first token_words words (input tokens a graph's argmax fed) stay
    as they are; the rest and the host words are the new batch's."""
    from pymllm.executor.batch_inputs import StaticWordsUpload

    device_words = torch.full((6,), -1, dtype=torch.int64)
    up = StaticWordsUpload(device_words, total_words=9, stream=lambda: None, token_words=2)
    for step in range(2):
        words = np.arange(9, dtype=np.int64) + 100 * step
        host = up.upload(words, keep_tokens=True)
        assert device_words.tolist() == [-1, -1] + words[2:6].tolist() and host.tolist() == words.tolist()
    up.upload(np.zeros(9, dtype=np.int64))
    assert device_words.tolist() == [0] * 6


def test_graph_layout_puts_the_input_tokens_first_and_one_readback_word() -> None:
    from pymllm.executor.batch_inputs import graph_layout

    layout = graph_layout(8)
    assert layout.segments["input_ids"].offset == 0 and layout.segments["readback_slot"].capacity == 1
    assert "readback_slot" not in layout.host_only


def test_readback_rows_cycle_past_the_scratch_row() -> None:
    """reserve() hands out rows 1..DEPTH in turn (row 0 is the graphs' scratch row); mirrored()
    views a row a kernel wrote; on the CPU start() hands the ids back as they are (the copy into
    the reserved row is CUDA's, covered by the GPU decode tests)."""
    from pymllm.executor.pending_batch import Readback

    rb = Readback(max_rows=4, device=torch.device("cpu"))
    assert rb.ring.shape == (Readback.DEPTH + 1, 4)
    assert [rb.reserve() for _ in range(2 * Readback.DEPTH)] == list(range(1, Readback.DEPTH + 1)) * 2
    rb.ring[2, :3] = torch.tensor([7, 8, 9])
    host, event = rb.mirrored(2, 3)
    assert host.tolist() == [7, 8, 9] and event is None
    ids = torch.tensor([4, 5])
    host, copies, event = rb.start(ids, slot=3)
    assert host is ids and copies == [] and event is None  # on the CPU the ids are already on the host


def test_last_token_rows_gathers_only_for_extends() -> None:
    from pymllm.engine.forward_batch import ForwardBatch

    hidden = torch.arange(12.0).view(6, 2)
    common = dict(input_ids=torch.zeros(6, dtype=torch.int64), positions=None, req_pool_indices=None,
                  seq_lens=None, out_cache_loc=None, seq_lens_cpu=[], req_to_token_pool=None, kv_pool=None,
                  attn_backend=None)
    decode = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=6, **common)
    assert decode.last_token_rows(hidden) is hidden  # every decode row is a last token: no kernel
    extend = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=2, **common)
    extend.extend_seq_lens = torch.tensor([2, 4])
    assert extend.last_token_rows(hidden).tolist() == [hidden[1].tolist(), hidden[5].tolist()]

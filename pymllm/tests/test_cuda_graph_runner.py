"""CUDA-graph bookkeeping on CPU: batch-size buckets, padding, and when graphs are built.

The capture/replay itself needs a GPU (test_gpu_fast_path.py); replay through the static
buffers with padding is also emulated against torch_native in test_flashinfer_metadata.py.
"""

from __future__ import annotations

import types

import pytest
import torch

from pymllm.configs import ConfigError, ServerConfig, parse_config
from pymllm.engine.forward_batch import ForwardBatch, ForwardMode
from pymllm.executor import cuda_graph_runner as cgr


def test_capture_batch_sizes_follow_the_documented_buckets():
    sizes = cgr.capture_batch_sizes(256)
    assert sizes[:9] == [1, 2, 4, 8, 12, 16, 24, 32, 40]
    assert sizes[-1] == 256 and all(b - a == 8 for a, b in zip(sizes[5:], sizes[6:]))
    assert cgr.capture_batch_sizes(300)[-4:] == [256, 272, 288, 300]
    assert cgr.capture_batch_sizes(320)[-3:] == [288, 304, 320]
    assert cgr.capture_batch_sizes(64)[-3:] == [48, 56, 64]
    # The largest batch the scheduler can form always has its own graph.
    assert cgr.capture_batch_sizes(3) == [1, 2, 3]
    assert cgr.capture_batch_sizes(1) == [1]
    assert cgr.capture_batch_sizes(13) == [1, 2, 4, 8, 12, 13]


def test_padded_batch_size_picks_the_next_bucket():
    sizes = cgr.capture_batch_sizes(64)
    assert [cgr.padded_batch_size(b, sizes) for b in (1, 2, 3, 4, 5, 9, 13, 17, 33, 64)] == [
        1, 2, 4, 4, 8, 12, 16, 24, 40, 64,
    ]
    with pytest.raises(ValueError, match="65"):
        cgr.padded_batch_size(65, sizes)


def test_graph_max_batch_size_reads_cuda_graph_max_bs():
    server = ServerConfig(max_running_requests=48)
    assert cgr.graph_max_batch_size(server) == 48
    server.cuda_graph_max_bs = 16
    assert cgr.graph_max_batch_size(server) == 16
    server.cuda_graph_max_bs = 512  # never more than a decode batch or a short extend needs
    assert cgr.graph_max_batch_size(server) == 48
    # Few running requests: graphs still cover a short extend's rows, unless the flag says less.
    small = ServerConfig(max_running_requests=4)
    assert cgr.graph_max_batch_size(small) == cgr.EXTEND_AS_DECODE_MAX_TOKENS
    small.cuda_graph_max_bs = 8
    assert cgr.graph_max_batch_size(small) == 8


def test_extend_runs_as_decode_rule():
    top = cgr.EXTEND_AS_DECODE_MAX_TOKENS
    assert cgr.extend_runs_as_decode(top, 2032, False, 64)
    assert not cgr.extend_runs_as_decode(top + 1, 2032, False, 64)  # a real prefill
    assert not cgr.extend_runs_as_decode(8, 100, True, 64)  # images need the vision tower
    assert not cgr.extend_runs_as_decode(16, 100, False, 8)  # more rows than the graphs hold
    assert not cgr.extend_runs_as_decode(top, cgr.EXTEND_AS_DECODE_MAX_KV_READS // top + 1, False, 64)
    # One request's rows in a shared-prefix graph read the prefix once, however long it is.
    assert cgr.extend_runs_as_decode(top, cgr.EXTEND_AS_DECODE_MAX_KV_READS // top + 1, False, 64, True)
    assert not cgr.extend_runs_as_decode(top + 1, 2032, False, 64, True)
    assert not cgr.extend_runs_as_decode(0, 1, False, 64)


def test_flags_parse_and_validate():
    cfg = parse_config(["--server.disable_cuda_graph", "--server.cuda_graph_max_bs", "24"])
    assert cfg.server.disable_cuda_graph is True and cfg.server.cuda_graph_max_bs == 24
    defaults = parse_config([])
    assert defaults.server.disable_cuda_graph is False and defaults.server.cuda_graph_max_bs is None
    with pytest.raises(ConfigError, match="--server.cuda_graph_max_bs"):
        parse_config(["--server.cuda_graph_max_bs", "0"])


class _Backend:
    def __init__(self, graphs: bool):
        self.name = "fake"
        self._graphs = graphs

    def supports_cuda_graph(self) -> bool:
        return self._graphs


def test_when_graphs_are_captured():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cgr.cuda_graph_disabled_reason(ServerConfig(), cuda, _Backend(True)) is None
    off = ServerConfig(disable_cuda_graph=True)
    assert cgr.cuda_graph_disabled_reason(off, cuda, _Backend(True)) == "--server.disable_cuda_graph"
    assert "cpu" in cgr.cuda_graph_disabled_reason(ServerConfig(), cpu, _Backend(True))
    assert "does not support" in cgr.cuda_graph_disabled_reason(ServerConfig(), cuda, _Backend(False))
    runner = types.SimpleNamespace(server=off, device=cuda, attn_backend=_Backend(True))
    assert cgr.build_cuda_graph_runner(runner) is None


def test_cpu_model_runner_has_no_graph_runner():
    from pymllm.testing.tiny_models import tiny_model_dir
    from pymllm.tests.helpers import make_scheduler

    sched = make_scheduler(tiny_model_dir("qwen3"), max_total_tokens=64)
    assert sched.runner.cuda_graph_runner is None


def _decode_batch(bs: int, mrope: bool = False) -> ForwardBatch:
    return ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        batch_size=bs,
        input_ids=torch.arange(100, 100 + bs),
        positions=torch.arange(10, 10 + bs),
        req_pool_indices=torch.arange(bs),
        seq_lens=torch.arange(11, 11 + bs, dtype=torch.int32),
        out_cache_loc=torch.arange(50, 50 + bs),
        seq_lens_cpu=list(range(11, 11 + bs)),
        mrope_position_deltas=torch.full((bs, 1), -3) if mrope else None,
    )


def test_graph_inputs_fill_pads_with_reserved_rows():
    padding_row = 9
    inputs = cgr.GraphInputs.allocate(8, torch.device("cpu"), padding_row, row_stride=100)
    assert inputs.req_pool_indices.tolist() == [padding_row] * 8 and inputs.seq_lens.tolist() == [1] * 8
    inputs.fill(_decode_batch(7, mrope=True), 8)
    # A smaller batch must reset rows the previous one left behind.
    inputs.fill(_decode_batch(3), 4)
    assert inputs.input_ids[:4].tolist() == [100, 101, 102, 0]
    assert inputs.req_pool_indices[:4].tolist() == [0, 1, 2, padding_row]
    assert inputs.seq_lens[:4].tolist() == [11, 12, 13, 1]
    assert inputs.out_cache_loc[:4].tolist() == [50, 51, 52, 0]
    assert inputs.positions[:4].tolist() == [10, 11, 12, 0]
    assert inputs.mrope_position_deltas[:4].tolist() == [0, 0, 0, 0]
    # Its builder wrote its req_to_token entries: the graph's writes are all padding's no-ops.
    assert inputs.kv_write_index[:4].tolist() == [padding_row * 100] * 4 and inputs.kv_write_loc[:4].tolist() == [0] * 4
    inputs.fill(_decode_batch(2, mrope=True), 2)
    assert inputs.mrope_position_deltas[:2].tolist() == [-3, -3]
    assert cgr.padded_seq_lens_cpu([11, 12, 13], 4) == [11, 12, 13, 1]

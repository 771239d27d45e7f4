"""What the decode CUDA graphs read and what the runner keeps about a staged step: the static
input buffers every graph reads (``GraphInputs``), a step packed ahead of time (``NextDecode``)
and a step already in those buffers (``StagedDecode``). CudaGraphRunner owns all three."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from pymllm.engine.forward_batch import ForwardBatch
from pymllm.executor.batch_inputs import HostBatch, PackedLayout, decode_host_batch, graph_layout, pack_graph


@dataclass
class GraphInputs:
    """Static input buffers every captured graph reads (sliced to its batch size).

    All of them are views of one int64 device buffer laid out by ``graph_layout``, so a batch
    padded on the host reaches every field with one copy.
    """

    layout: PackedLayout
    words: torch.Tensor  # [layout.device_words] int64, never reallocated after capture
    input_ids: torch.Tensor  # [max_bs] int64
    req_pool_indices: torch.Tensor  # [max_bs] int64
    seq_lens: torch.Tensor  # [max_bs] int32
    out_cache_loc: torch.Tensor  # [max_bs] int64
    positions: torch.Tensor  # [max_bs] int64
    mrope_position_deltas: torch.Tensor  # [max_bs] int64, zeros unless the batch has deltas
    readback_slot: torch.Tensor  # [1] int64: the host ring row the graph's argmax writes (Readback)
    # Each row's req_to_token write, req_to_token.view(-1)[kv_write_index] = kv_write_loc: inside
    # the graphs (graph_metadata_kernels gave a prologue) or eagerly before replay.
    kv_write_index: torch.Tensor  # [max_bs] int64
    kv_write_loc: torch.Tensor  # [max_bs] int32
    padding_row: int
    padding_write_index: int  # position 0 of the padding row: writing slot 0 there changes nothing

    @classmethod
    def allocate(cls, max_bs: int, device: torch.device, padding_row: int, row_stride: int) -> "GraphInputs":
        layout = graph_layout(max_bs)
        empty = decode_host_batch([], [], [], [], 0)
        packed = pack_graph(empty, layout, max_bs, padding_row, row_stride)
        words = torch.from_numpy(packed[: layout.device_words]).to(device)
        return cls(layout=layout, words=words, padding_row=padding_row,
                   padding_write_index=padding_row * row_stride, **layout.torch_views(words))

    def fill(self, fb: ForwardBatch, padded_bs: int) -> None:
        """Copy a decode batch built elsewhere into rows [0, bs) and reset rows [bs, padded_bs)
        to padding (batches from ModelRunner.build_forward_batch arrive already staged). Its
        builder has already written its req_to_token entries: every row's write is padding's."""
        bs = fb.batch_size
        pad = slice(bs, padded_bs)
        for name, value in (("input_ids", 0), ("req_pool_indices", self.padding_row), ("seq_lens", 1),
                            ("out_cache_loc", 0), ("positions", 0)):
            buf = getattr(self, name)
            buf[:bs].copy_(getattr(fb, name), non_blocking=True)
            buf[pad].fill_(value)
        self.readback_slot.zero_()  # the scratch row: nobody reads this step's ids from the ring
        self.kv_write_index[:padded_bs].fill_(self.padding_write_index)
        self.kv_write_loc[:padded_bs].zero_()
        if fb.mrope_position_deltas is not None:
            self.mrope_position_deltas[:bs].copy_(fb.mrope_position_deltas.view(-1), non_blocking=True)
        else:
            self.mrope_position_deltas[:bs].zero_()
        self.mrope_position_deltas[pad].zero_()


@dataclass
class NextDecode:
    """The decode step predicted to follow a staged one (``CudaGraphRunner.predict_next``),
    packed while the GPU ran that one; its tokens and new slots are filled in at staging."""

    rows: List[int]  # req_pool_idx of each request, in batch order
    positions: List[int]  # each request's next position (its prefix length then)
    hb: HostBatch
    padded_bs: int


@dataclass
class StagedDecode:
    """A decode batch already copied into the static buffers by CudaGraphRunner.stage."""

    batch: Optional[ForwardBatch]  # None only while _stage_words builds it
    padded_bs: int
    kv_indptr_host: torch.Tensor  # [padded_bs + 1] int32, pinned on CUDA
    seq_lens_host: torch.Tensor  # [padded_bs] int32, pinned on CUDA
    shared_prefix: bool = False  # replays the graph whose rows all extend one request
    launched: bool = False  # its graph already runs (a predicted step, see stage_next)
    # The rows' input tokens on the device (the ids of a step still in flight), copied into the
    # static input ids right before the replay; None: the uploaded words hold them, or (fed) the
    # argmax of the step before already wrote them there.
    device_tokens: Optional[torch.Tensor] = None
    # The Readback ring row this step's argmax writes its ids to, or None (the scratch row).
    readback_slot: Optional[int] = None

"""Runner-side multimodal glue: turns the images and mrope data of a scheduled batch into the
inputs a multimodal model (``model.uses_mrope``) reads from its ForwardBatch.

- EXTEND: when any request carries images, ``fb.positions`` becomes [3, T] (each request's
  precomputed mrope positions for its chunk; text-only requests repeat their 1-D positions) and
  ``fb.extras["mm"]`` holds the vision rows of the image tokens in this batch. The ViT runs
  once per request, on the first chunk that contains one of its image tokens; its output stays
  on the request (``MultimodalInputs.vision_cache``) until its prompt is fully prefilled.
- DECODE: nothing to do here: ``executor/batch_inputs.host_batch`` packs each request's mrope
  delta with the other inputs (straight into the CUDA graph's static buffer when replaying), and
  the model adds ``fb.mrope_position_deltas`` to ``fb.positions`` inside its forward.

Called by ModelRunner.build_forward_batch after the ForwardBatch exists (the KV-slot scatter
has already used the sequential positions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List

import numpy as np
import torch

from pymllm.engine.forward_batch import ForwardBatch
from pymllm.orchestrator.schedule_batch import ScheduledBatch

if TYPE_CHECKING:
    from pymllm.multimodal.inputs import MultimodalInputs


def attach_multimodal_inputs(model, batch: ScheduledBatch, fb: ForwardBatch, device: torch.device) -> None:
    if not getattr(model, "uses_mrope", False):
        return
    mms = [getattr(r, "mm_inputs", None) for r in batch.reqs]
    if all(mm is None for mm in mms):
        return
    if batch.mode.is_decode():
        return  # decode deltas travel with the packed batch inputs (executor/batch_inputs.py)
    _attach_extend(model, batch, fb, mms, device)


def _vision_rows(model, mm: "MultimodalInputs", device: torch.device):
    """ViT output of all images of a request: (embeds, [deepstack...]), cached on ``mm``."""
    if mm.vision_cache is None:
        pixels = torch.from_numpy(np.ascontiguousarray(mm.pixel_values)).to(device)
        mm.vision_cache = model.encode_images(pixels, mm.image_grid_thw.tolist())
    return mm.vision_cache


def _attach_extend(model, batch: ScheduledBatch, fb: ForwardBatch, mms: List, device: torch.device) -> None:
    total = sum(batch.extend_lens)
    positions = np.empty((3, total), dtype=np.int64)
    indices: List[np.ndarray] = []
    embeds: List[torch.Tensor] = []
    deepstack: List[List[torch.Tensor]] = []
    offset = 0
    for req, mm, prefix, n, done in zip(batch.reqs, mms, batch.prefix_lens, batch.extend_lens, batch.sample):
        if mm is None:
            positions[:, offset : offset + n] = np.arange(prefix, prefix + n)
            offset += n
            continue
        positions[:, offset : offset + n] = mm.positions_for(prefix, prefix + n)
        prompt = np.asarray(req.origin_input_ids[: mm.mrope_positions.shape[1]], dtype=np.int64)
        is_image = prompt == mm.image_token_id
        chunk = is_image[prefix : prefix + n]
        if chunk.any():
            first = int(is_image[:prefix].sum())  # image rows before this chunk
            count = int(chunk.sum())
            rows, ds = _vision_rows(model, mm, device)
            indices.append(np.flatnonzero(chunk) + offset)
            embeds.append(rows[first : first + count])
            if not deepstack:
                deepstack = [[] for _ in ds]
            for layer, feat in enumerate(ds):
                deepstack[layer].append(feat[first : first + count])
        if done:
            mm.vision_cache = None  # prompt complete: the rows live on in the KV cache
        offset += n
    fb.positions = torch.from_numpy(positions).to(device, non_blocking=True)
    if indices:
        from pymllm.models.qwen3_vl import MultimodalForwardInputs

        fb.extras["mm"] = MultimodalForwardInputs(
            image_indices=torch.from_numpy(np.concatenate(indices)).to(device, non_blocking=True),
            image_embeds=torch.cat(embeds, dim=0),
            deepstack_embeds=[torch.cat(parts, dim=0) for parts in deepstack],
        )

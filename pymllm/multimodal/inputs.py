"""Per-request multimodal data and the pure functions that derive it from token ids.

Everything here is numpy / plain Python so that it pickles cheaply over ZMQ and is testable
without a model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class MultimodalInputs:
    """The images of one request, preprocessed, plus what the model needs to place them."""

    pixel_values: np.ndarray  # [num_patches, C * T * P * P] float32, images concatenated
    image_grid_thw: np.ndarray  # [num_images, 3] int64: patch grid (t, h, w) per image
    image_hashes: List[int]  # content hash per image
    image_token_id: int
    mrope_positions: np.ndarray  # [3, prompt_len] int64
    mrope_position_delta: int  # max position + 1 - prompt_len; decode position = seq pos + delta
    spatial_merge_size: int = 2
    # Runner-side cache of the ViT output while the prompt is prefilled (never pickled).
    vision_cache: Optional[tuple] = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["vision_cache"] = None
        return state

    def tokens_per_image(self) -> List[int]:
        return image_token_counts(self.image_grid_thw, self.spatial_merge_size)

    def positions_for(self, start: int, end: int) -> np.ndarray:
        """mrope positions [3, end - start] of sequence positions [start, end); past the prompt
        (output tokens being recomputed) every axis is seq position + delta."""
        prompt_len = self.mrope_positions.shape[1]
        out = np.empty((3, end - start), dtype=np.int64)
        head = max(0, min(end, prompt_len) - start)
        if head:
            out[:, :head] = self.mrope_positions[:, start : start + head]
        if head < end - start:
            out[:, head:] = np.arange(start + head, end, dtype=np.int64) + self.mrope_position_delta
        return out


def image_token_counts(grid_thw: np.ndarray, merge: int) -> List[int]:
    return [int(t * h * w) // (merge * merge) for t, h, w in np.asarray(grid_thw).tolist()]


def expand_image_placeholders(ids: Sequence[int], image_token_id: int, counts: Sequence[int]) -> List[int]:
    """Replace the i-th ``image_token_id`` in ``ids`` by ``counts[i]`` copies of it.

    ValueError when the number of placeholders differs from the number of images.
    """
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(counts):
        raise ValueError(f"the prompt has {found} image placeholder(s) for {len(counts)} image(s)")
    out: List[int] = []
    it = iter(counts)
    for t in ids:
        if t == image_token_id:
            out.extend([image_token_id] * next(it))
        else:
            out.append(t)
    return out


def mrope_positions(
    ids: Sequence[int], image_token_id: int, grid_thw: np.ndarray, spatial_merge_size: int
) -> Tuple[np.ndarray, int]:
    """3-D rope positions [3, len(ids)] and the delta (max position + 1 - len(ids)).

    Text tokens advance all three axes together. Image i occupies the next t*h*w/m^2 placeholder
    tokens (t, h, w its patch grid, m the merge size); starting at the current position s, its
    token at (ti, hi, wi) of the merged grid gets (s + ti, s + hi, s + wi), and the text after
    it resumes at s + max(h, w) / m. This is transformers' ``get_rope_index`` for images.
    """
    ids = np.asarray(ids, dtype=np.int64)
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    pos = np.empty((3, ids.size), dtype=np.int64)
    is_image = ids == image_token_id
    i, current, image = 0, 0, 0
    n = ids.size
    while i < n:
        if not is_image[i]:
            j = i
            while j < n and not is_image[j]:
                j += 1
            pos[:, i:j] = np.arange(current, current + (j - i))
            current += j - i
            i = j
            continue
        if image >= len(grids):
            raise ValueError("more image placeholder tokens than image grids")
        t, h, w = (int(v) for v in grids[image])
        gh, gw = h // spatial_merge_size, w // spatial_merge_size
        count = t * gh * gw
        if i + count > n or not is_image[i : i + count].all():
            raise ValueError(f"image {image} needs {count} consecutive placeholder tokens")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        pos[0, i : i + count] = tt.reshape(-1) + current
        pos[1, i : i + count] = hh.reshape(-1) + current
        pos[2, i : i + count] = ww.reshape(-1) + current
        current += max(gh, gw)
        i += count
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} image grids but {image} placeholder runs")
    delta = int(pos.max()) + 1 - n if n else 0
    return pos, delta


def image_content_hash(pixel_values: np.ndarray, grid_thw: Sequence[int]) -> int:
    """A 63-bit content hash of one preprocessed image (its pixel values and patch grid)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(grid_thw, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(pixel_values, dtype=np.float32).tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def cache_key(ids: Sequence[int], mm: Optional[MultimodalInputs]) -> List[int]:
    """Prefix-cache key: ``ids`` with each image's placeholder tokens replaced by a value derived
    from that image's content hash (negative, so it never equals a token id). Requests with
    different images part ways at the first placeholder; identical images share entries."""
    if mm is None:
        return list(ids)
    key = list(ids)
    counts = mm.tokens_per_image()
    values = [-1 - h for h in mm.image_hashes]
    image, left = 0, counts[0] if counts else 0
    prompt_len = mm.mrope_positions.shape[1]
    for i in range(min(len(key), prompt_len)):
        if key[i] != mm.image_token_id or image >= len(counts):
            continue
        key[i] = values[image]
        left -= 1
        if left == 0:
            image += 1
            left = counts[image] if image < len(counts) else 0
    return key

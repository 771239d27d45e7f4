"""Tokenizer-side image pipeline: find the images of a chat request, load them, run
transformers' image processor (the PIL backend: no torchvision needed), expand the
placeholders and compute mrope positions and content hashes."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from pymllm.multimodal.inputs import (
    MultimodalInputs,
    expand_image_placeholders,
    image_content_hash,
    image_token_counts,
    mrope_positions,
)
from pymllm.multimodal.media import MediaError, MediaPolicy, load_image

logger = logging.getLogger(__name__)

IMAGE_PART_TYPES = ("image_url", "image")


def image_urls_of(messages: Optional[Sequence[Dict[str, Any]]]) -> List[str]:
    """The image URLs of a chat request, in the order the chat template emits them."""
    urls: List[str] = []
    for msg in messages or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in IMAGE_PART_TYPES:
                continue
            ref = part.get("image_url", part.get("image"))
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise MediaError("an image part has no url")
            urls.append(url)
    return urls


def is_multimodal_config(hf_config) -> bool:
    return getattr(hf_config, "vision_config", None) is not None and getattr(hf_config, "image_token_id", None) is not None


def load_image_processor(path: str):
    """transformers' image processor of a checkpoint, PIL backend (no torchvision)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    except TypeError:  # a transformers without the backend switch
        return AutoImageProcessor.from_pretrained(path)


class MultimodalProcessor:
    """Turns (prompt ids with one placeholder per image, image URLs) into expanded ids and
    :class:`MultimodalInputs`."""

    def __init__(self, image_processor, hf_config, policy: MediaPolicy):
        self.image_processor = image_processor
        self.policy = policy
        self.image_token_id = int(hf_config.image_token_id)
        vision = hf_config.vision_config
        self.spatial_merge_size = int(vision.spatial_merge_size)
        proc_merge = int(getattr(image_processor, "merge_size", self.spatial_merge_size))
        proc_patch = int(getattr(image_processor, "patch_size", vision.patch_size))
        if proc_merge != self.spatial_merge_size or proc_patch != int(vision.patch_size):
            raise ValueError(
                f"image processor (patch {proc_patch}, merge {proc_merge}) does not match the vision config "
                f"(patch {vision.patch_size}, merge {self.spatial_merge_size})"
            )

    @classmethod
    def from_pretrained(cls, path: str, hf_config, policy: MediaPolicy) -> "MultimodalProcessor":
        return cls(load_image_processor(path), hf_config, policy)

    def preprocess(self, images) -> Tuple[np.ndarray, np.ndarray]:
        try:
            out = self.image_processor(images=list(images), return_tensors="np")
        except ValueError as e:  # e.g. aspect ratio beyond what the resize supports
            raise MediaError(f"cannot preprocess the image: {e}") from None
        return (np.ascontiguousarray(out["pixel_values"], dtype=np.float32),
                np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3))

    def process(self, ids: Sequence[int], urls: Sequence[str]) -> Tuple[List[int], MultimodalInputs]:
        images = [load_image(url, self.policy) for url in urls]
        pixel_values, grids = self.preprocess(images)
        return self.build(ids, pixel_values, grids)

    def build(self, ids: Sequence[int], pixel_values: np.ndarray, grids: np.ndarray) -> Tuple[List[int], MultimodalInputs]:
        counts = image_token_counts(grids, self.spatial_merge_size)
        try:
            expanded = expand_image_placeholders(ids, self.image_token_id, counts)
        except ValueError as e:
            raise MediaError(f"{e}; the chat template must emit one image placeholder per image") from None
        positions, delta = mrope_positions(expanded, self.image_token_id, grids, self.spatial_merge_size)
        hashes, start = [], 0
        for grid in grids:
            n = int(np.prod(grid))
            hashes.append(image_content_hash(pixel_values[start : start + n], grid))
            start += n
        mm = MultimodalInputs(
            pixel_values=pixel_values,
            image_grid_thw=grids,
            image_hashes=hashes,
            image_token_id=self.image_token_id,
            mrope_positions=positions,
            mrope_position_delta=delta,
            spatial_merge_size=self.spatial_merge_size,
        )
        return expanded, mm

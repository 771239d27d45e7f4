"""Image inputs: loading under a media policy, preprocessing, placeholder expansion, 3-D
mrope positions and content hashes. Runs in the tokenizer process; the results travel to the
scheduler as a :class:`~pymllm.multimodal.inputs.MultimodalInputs`."""

from pymllm.multimodal.inputs import (
    MultimodalInputs,
    cache_key,
    expand_image_placeholders,
    image_content_hash,
    mrope_positions,
)
from pymllm.multimodal.media import MediaError, MediaPolicy, load_image

__all__ = [
    "MediaError",
    "MediaPolicy",
    "MultimodalInputs",
    "cache_key",
    "expand_image_placeholders",
    "image_content_hash",
    "load_image",
    "mrope_positions",
]

"""Image requests for ``python -m pymllm.bench_one_batch --image WxH``: random images prepared as
the tokenizer process prepares them, and the ViT's share of the timed prefill."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Iterator, List, Tuple

import numpy as np
import torch

from pymllm.bench_roofline import _sync
from pymllm.configs.errors import ConfigError
from pymllm.configs.global_config import GlobalConfig
from pymllm.configs.model_config import ModelConfig
from pymllm.multimodal.inputs import MultimodalInputs, image_token_counts
from pymllm.multimodal.media import MediaPolicy
from pymllm.multimodal.processor import MultimodalProcessor, is_multimodal_config
from pymllm.multimodal.synthetic import random_images


class ImagePrompts:
    """Image requests built as the tokenizer process builds them: random images through the
    checkpoint's image processor, placeholders expanded, mrope positions computed."""

    def __init__(self, processor: MultimodalProcessor, hf_config, size: Tuple[int, int], per_request: int):
        self.processor = processor
        self.size = size
        self.per_request = per_request
        # What the chat template emits per image, before the placeholder is expanded.
        self.image_markup = [
            int(hf_config.vision_start_token_id), processor.image_token_id, int(hf_config.vision_end_token_id)
        ]
        # Random text leaves out the markup tokens: a stray placeholder would count as an image.
        vocab = (getattr(hf_config, "text_config", None) or hf_config).vocab_size
        self.text_vocab = np.setdiff1d(np.arange(vocab), self.image_markup)
        # The processor resizes every image of one size to the same grid.
        _, grids = processor.preprocess(random_images(np.random.default_rng(0), size, 1))
        self.tokens_per_image = image_token_counts(grids, processor.spatial_merge_size)[0]

    @property
    def image_tokens(self) -> int:
        """Image placeholder tokens per request."""
        return self.per_request * self.tokens_per_image

    @property
    def extra_prompt_tokens(self) -> int:
        """Prompt tokens per request besides the text: the placeholders and their markup."""
        return self.image_tokens + self.per_request * (len(self.image_markup) - 1)

    def prompt(self, rng: np.random.Generator, text_len: int) -> Tuple[List[int], MultimodalInputs]:
        pixel_values, grids = self.processor.preprocess(random_images(rng, self.size, self.per_request))
        text = rng.choice(self.text_vocab, text_len).tolist()
        return self.processor.build(self.image_markup * self.per_request + text, pixel_values, grids)


def load_image_prompts(config: GlobalConfig, model_config: ModelConfig, size: Tuple[int, int],
                       per_request: int) -> ImagePrompts:
    """ConfigError when the model takes no images or its image processor config is missing."""
    hf_config = model_config.hf_config
    if not is_multimodal_config(hf_config):
        raise ConfigError(
            f"--image needs an image model (e.g. Qwen3-VL); {model_config.model_path} is "
            f"{model_config.architecture}"
        )
    # As in the tokenizer process: with the weights, or with the tokenizer when split.
    dirs = [model_config.model_path, model_config.tokenizer_path]
    found = [d for d in dirs if os.path.isfile(os.path.join(d, "preprocessor_config.json"))]
    if not found:
        raise ConfigError(
            f"--image needs the image processor config (preprocessor_config.json) in "
            f"{' or '.join(sorted(set(dirs)))}; copy it from the checkpoint (also for --server.load_format dummy)"
        )
    processor = MultimodalProcessor.from_pretrained(found[0], hf_config, MediaPolicy.from_server_config(config.server))
    return ImagePrompts(processor, hf_config, size, per_request)


@contextlib.contextmanager
def timed_vision(model: torch.nn.Module, device: torch.device, spent: List[float]) -> Iterator[None]:
    """Appends the duration of every ``model.encode_images`` call to ``spent``. The ViT runs
    inside the prefill step (the runner's batch building), so the sync before it is the
    only thing this adds to the timed prefill."""
    encode: Callable = model.encode_images

    def timed(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        out = encode(*args, **kwargs)
        _sync(device)
        spent.append(time.perf_counter() - start)
        return out

    model.encode_images = timed
    try:
        yield
    finally:
        del model.encode_images  # the class's method again

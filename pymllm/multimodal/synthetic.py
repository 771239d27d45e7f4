"""Synthetic images for the benchmarks: the ``--image WxH`` argument, seeded random RGB images,
and their ``data:image/png;base64,`` form for chat requests."""

from __future__ import annotations

import argparse
import base64
import io
from typing import TYPE_CHECKING, List, Tuple

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


def image_size_arg(text: str) -> Tuple[int, int]:
    """argparse type of ``--image``: ``"640x480"`` -> (width, height) = (640, 480)."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1:
        raise argparse.ArgumentTypeError(f"image size {text!r} is not WIDTHxHEIGHT")
    return size


def random_images(rng: np.random.Generator, size: Tuple[int, int], count: int) -> List["Image.Image"]:
    """``count`` RGB images of uniform noise, (width, height) = ``size``."""
    from PIL import Image

    width, height = size
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB") for _ in range(count)]


def png_data_url(image: "Image.Image") -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

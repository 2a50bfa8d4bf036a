"""Qwen-Image-Edit-Plus (Edit-2509, Edit-2511): instruction editing with 1-3 input images,
`QwenImageEditPlusPipeline`. The VL encoder reads the images inside the chat template, and their VAE latents join
the transformer's sequence after the noise tokens (`conditioning`); Edit-2511 modulates those condition tokens at
t = 0 (`zero_cond_t` in its transformer config, honoured by the transformer itself and by the engine's row
routing)."""

from __future__ import annotations

import math

from lightray.models.base import ModelFamily
from lightray.models.qwen_image import TRANSFORMER_BLOCK_LINEARS

MAX_INPUT_IMAGES = 3
"""Input images Qwen-Image-Edit-Plus was trained with (one to three)."""

QWEN_IMAGE_EDIT_PLUS = ModelFamily(
    name="qwen-image-edit-plus",
    pipeline="QwenImageEditPlusPipeline",
    task="edit",
    endpoints=("edits",),
    input_images=(1, MAX_INPUT_IMAGES),
    condition_tokens=True,
    lora_targets=TRANSFORMER_BLOCK_LINEARS,
)


def calculate_dimensions(target_area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of `target_area` pixels at `ratio` = width / height, each rounded to a multiple of 32: the
    pipeline's `calculate_dimensions`."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def condition_size(image_size: tuple[int, int], area: int) -> tuple[int, int]:
    """(width, height) an input image of `image_size` is resized to for `area` pixels."""
    width, height = image_size
    return calculate_dimensions(area, width / height)

"""How Qwen-Image-Edit-Plus (Edit-2509 / Edit-2511) turns an instruction and 1-3 input images into conditioning,
exactly as `diffusers.QwenImageEditPlusPipeline.__call__` does:

* each input image is resized twice, keeping its aspect ratio: to `condition_image_area` pixels (rounded to
  multiples of 32) for the Qwen2.5-VL encoder, which reads it as vision tokens inside the chat template
  ("Picture 1: <|vision_start|><|image_pad|><|vision_end|>…"), and to `vae_image_area` pixels for the VAE, whose
  latents join the transformer's sequence after the noise tokens;
* the prompt's embeddings are the encoder's last hidden state after the system prefix of the template.

The pipeline's areas are module constants (384² and 1024²); a preset carries them as data
(`lightray.config.EditConfig`) so a scaled-down model can use its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from lightray.models.qwen_image import template_prefix_length
from lightray.models.qwen_image_edit import condition_size
from lightray.models.vl_processor import pil_processor


def load_processor(folder: Path, tokenizer):
    """The Qwen2-VL processor of a model folder (`processor/preprocessor_config.json`) around `tokenizer`, with the
    PIL image processor (`lightray.models.vl_processor`)."""
    import json

    from transformers import Qwen2VLProcessor

    config = json.loads((folder / "processor" / "preprocessor_config.json").read_text())
    return pil_processor(Qwen2VLProcessor, config, tokenizer)


def text_pipeline(folder: Path, dtype: torch.dtype = torch.float32, prompt_template_encode_start_idx: int | None = None):
    """A `QwenImageEditPlusPipeline` holding only the text encoder, tokenizer and processor of `folder`: its
    `encode_prompt` is what conditions an edit. The template's system prefix is measured on the folder's tokenizer
    unless given (64 for the real Qwen tokenizer)."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=dtype).eval()
    pipe = QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer,
                                     processor=load_processor(folder, tokenizer), transformer=None)
    pipe.set_progress_bar_config(disable=True)
    if prompt_template_encode_start_idx is None:
        prompt_template_encode_start_idx = template_prefix_length(tokenizer, pipe.prompt_template_encode)
    pipe.prompt_template_encode_start_idx = prompt_template_encode_start_idx
    return pipe


def condition_images(pipe, images: list[Image.Image], area: int) -> list[Image.Image]:
    """The images as the VL encoder sees them: each resized to `area` pixels at its aspect ratio
    (`pipe.image_processor.resize`, as `__call__` does)."""
    out = []
    for image in images:
        width, height = condition_size(image.size, area)
        out.append(pipe.image_processor.resize(image, height, width))
    return out


@torch.inference_mode()
def encode_instruction(pipe, prompt: str, images: list[Image.Image], area: int) -> torch.Tensor:
    """[tokens, hidden] embeddings of `prompt` about `images` (the pipeline's `encode_prompt`, unpadded)."""
    embeds, mask = pipe.encode_prompt(prompt, image=condition_images(pipe, images, area), device=pipe.text_encoder.device)
    return embeds[0] if mask is None else embeds[0, : int(mask[0].sum())]

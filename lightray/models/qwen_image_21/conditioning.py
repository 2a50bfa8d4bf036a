"""How Qwen-Image-2.1 turns a prompt and 0-3 condition images into the transformer's conditioning, with the 2.1
modular pipeline's own functions (`diffusers/modular_pipelines/qwenimage21/encoders.py`):

* each condition image is resized once, to the output's area at its aspect ratio (sides multiples of 32), as
  `QwenImage21ResizeStep` does; the same picture feeds both encoders;
* the Qwen3-VL encoder reads the prompt with the pictures in its chat template (`get_qwenimage21_prompt_embeds`):
  embeddings after the system prefix, and the image slots (`image_pad_mask`, one slot per 2×2 condition tokens);
* the VAE encodes each picture to its posterior mean, normalised (`encode_vae_image`, as
  `QwenImage21VaeEncoderStep`), packed unpatched (`pack_latents`).

A negative prompt is encoded as a prompt of its own with the same pictures (`QwenImage21TextEncoderStep`). The
served condition area is the output's (`QwenImage21ResizeStep` with `output_resolution` √(width·height)).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from lightray.models.vl_processor import pil_processor

VAE_SCALE_FACTOR = 16
"""The 2.1 VAE's spatial compression (the pipelines' `image_processor` config)."""


def load_processor(folder: Path, tokenizer=None):
    """The Qwen3-VL processor of a model folder (`processor/`: tokenizer, preprocessor_config.json, chat template)
    with the PIL image processor (`lightray.models.vl_processor`)."""
    from transformers import AutoTokenizer, Qwen3VLProcessor

    folder = Path(folder) / "processor"
    config = json.loads((folder / "preprocessor_config.json").read_text())
    template = folder / "chat_template.jinja"
    return pil_processor(Qwen3VLProcessor, config, tokenizer or AutoTokenizer.from_pretrained(folder),
                         template.read_text() if template.exists() else None)


def load_text_encoder(folder: Path, dtype: torch.dtype = torch.float32):
    """(Qwen3-VL text encoder, processor) of a 2.1 folder."""
    from transformers import Qwen3VLForConditionalGeneration

    encoder = Qwen3VLForConditionalGeneration.from_pretrained(Path(folder) / "text_encoder", dtype=dtype).eval()
    return encoder, load_processor(folder)


def resize_conditions(images: list[Image.Image], area: int) -> list[Image.Image]:
    """The pictures as both encoders see them: RGBA, resized to `area` pixels at their aspect ratio
    (`QwenImage21ResizeStep`, whose `output_resolution` is √area)."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.modular_pipelines.qwenimage21.encoders import calculate_dimensions

    processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR)
    out = []
    for image in images:
        image = image if image.mode == "RGBA" else image.convert("RGBA")
        width, height, _ = calculate_dimensions(area, image.width / image.height)
        out.append(processor.resize(image, height=height, width=width))
    return out


def prompt_tokens(processor, prompt: str) -> int:
    """Tokens of `prompt` itself as the Qwen3-VL tokenizer splits it, without the chat template: what a preset's
    `max_sequence_length` bounds. The 2.1 encoder truncates nothing, so a longer prompt is refused, not cut."""
    return len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def encode_prompt(text_encoder, processor, prompt: str, images: list[Image.Image] = ()
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """([tokens, hidden] embeddings, [tokens] image slots) of `prompt` about the resized `images` (none: a
    text-only prompt), unpadded: `get_qwenimage21_prompt_embeds` for one prompt."""
    from diffusers.modular_pipelines.qwenimage21.encoders import get_qwenimage21_prompt_embeds

    embeds, mask, slots = get_qwenimage21_prompt_embeds(text_encoder, processor, prompt, image=list(images) or None,
                                                        device=text_encoder.device)
    tokens = int(mask[0].sum())
    return embeds[0, :tokens], slots[0, :tokens]


@torch.inference_mode()
def encode_conditions(vae, images: list[Image.Image]) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
    """([tokens, 64] packed condition latents in order, each picture's token grid) of the resized `images`:
    `QwenImage21ProcessImagesInputStep`, `QwenImage21VaeEncoderStep` (posterior mean) and `pack_latents`."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.modular_pipelines.qwenimage21.encoders import encode_vae_image
    from diffusers.modular_pipelines.qwenimage21.inputs import pack_latents

    processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE_FACTOR)
    latents, grids = [], []
    for image in images:
        pixels = processor.preprocess(image, height=image.height, width=image.width)
        encoded = encode_vae_image(pixels, vae, None, vae.device, vae.dtype, latent_channels=vae.config.z_dim)
        latents.append(pack_latents(encoded)[0])
        grids.append(tuple(encoded.shape[-2:]))
    return torch.cat(latents), tuple(grids)

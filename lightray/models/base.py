"""The interface every model family gives the engine, the stages and the API (`lightray.models`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

Task = Literal["text-to-image", "edit", "text-to-image-and-edit"]
Endpoint = Literal["generations", "edits"]
TextEncoderKind = Literal["qwen2.5-vl", "qwen3-vl"]

Grid = tuple[int, int]
"""(rows, columns) of packed latent tokens: 2×2 patches of the VAE's latent grid."""


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the house needs to know of a family. The transformer class is Qwen-Image's in every family so far;
    what differs is how a request is conditioned and what one row of the transformer's batch holds."""

    name: str
    """The preset's `family` value."""
    pipeline: str
    """The diffusers pipeline whose `__call__` a request alone reproduces exactly (the numerics contract)."""
    task: Task
    endpoints: tuple[Endpoint, ...]
    """The API endpoints that serve a model of this family."""
    input_images: tuple[int, int]
    """Fewest and most input images an edit request takes (0, 0 for a family that takes none)."""
    condition_tokens: bool
    """Input images join the transformer's sequence as condition tokens after the noise tokens (and the
    prediction is sliced back to the noise tokens), rather than starting the denoising (img2img)."""
    lora_targets: tuple[str, ...]
    """Linear layers of a transformer block (peft `target_modules` suffixes) that Lightning and tenant LoRAs
    adapt."""
    transformer_class: str = "QwenImageTransformer2DModel"
    """The diffusers class of the folder's `transformer/`."""
    vae_class: str = "AutoencoderKLQwenImage"
    """The diffusers class of the folder's `vae/` (the VAE stage loads it)."""
    text_encoder: TextEncoderKind = "qwen2.5-vl"
    """How the text stage encodes a prompt: "qwen2.5-vl", the family's diffusers pipeline's `encode_prompt` over a
    Qwen2.5-VL encoder (Qwen-Image, Edit-Plus); "qwen3-vl", the 2.1 pipelines' `get_qwenimage21_prompt_embeds`,
    which also marks the prompt's image slots and truncates nothing (a longer prompt than the preset's
    `max_sequence_length` is refused, `lightray.models.qwen_image_21.conditioning`)."""
    latent_patch: int = 2
    """Side of the square of VAE latent pixels one transformer token holds: 2 for Qwen-Image's 2×2 packing, 1 for
    Qwen-Image-2.1, whose 16× VAE latents enter unpatched."""
    conditions_first: bool = False
    """Condition tokens come before the noise tokens in a row (Qwen-Image-2.1: condition images, then the target
    image), rather than after them (Qwen-Image-Edit-Plus)."""
    prefix_cache: bool = False
    """The transformer caches its prefix's (text and condition tokens') keys and values per layer: a request's first
    forward extracts them, its later forwards read them and compute the noise tokens alone
    (`lightray.engine.prefix_cache`)."""
    cfg_norm_rescale: bool = True
    """True CFG rescales the combined prediction to the conditional one's norm (Qwen-Image's pipelines); False: the
    plain `uncond + scale · (cond − uncond)` of diffusers' `ClassifierFreeGuidance` (Qwen-Image-2.1)."""

    def img_shapes(self, noise: Grid, conditions: tuple[Grid, ...] = ()) -> list[tuple[int, int, int]]:
        """One row's `img_shapes` entry as (frames, rows, columns): the noise grid, then each condition image's
        (`QwenImageEditPlusPipeline.__call__`; RoPE gives each image its own frame index), or the condition grids
        first when `conditions_first` (the 2.1 pipelines' order)."""
        noise_shape, condition_shapes = (1, *noise), [(1, *g) for g in conditions]
        return [*condition_shapes, noise_shape] if self.conditions_first else [noise_shape, *condition_shapes]

"""The three stages composed in one process: the CLI's offline mode, the benchmark's baseline, and the
reference the Serve graph is tested against."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lightray.config import ModelPreset, load_preset
from lightray.images import resize_for_model
from lightray.schemas import EditSpec, GenerationSpec
from lightray.stages import DenoiseJob, DenoiseStage, TextEncodeStage, VaeStage


def denoise_job(spec: GenerationSpec, embeds: list | None = None, adapter_path: str | None = None) -> DenoiseJob:
    """The denoiser's job for `spec`; `embeds` is the text stage's output for `prompts_of(spec)` (the graph
    leaves it None and the denoiser fills it from the encoder's response)."""
    return DenoiseJob(
        prompt_embeds=embeds[0] if embeds else None,
        negative_embeds=embeds[1] if embeds and len(embeds) > 1 else None,
        seeds=spec.seeds,
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.num_inference_steps,
        true_cfg_scale=spec.true_cfg_scale,
        variant=spec.model,
        adapter=spec.lora,
        adapter_path=adapter_path,
        adapter_scale=spec.lora_scale,
    )


def prompts_of(spec: GenerationSpec) -> list[str]:
    return [spec.prompt] if spec.negative_prompt is None else [spec.prompt, spec.negative_prompt]


class LocalPipeline:
    def __init__(self, preset: ModelPreset | str | None = None):
        self.preset = load_preset(preset) if preset is not None else load_preset()
        self.text = TextEncodeStage(self.preset)
        self.denoiser = DenoiseStage(self.preset)
        self.vae = VaeStage(self.preset)

    def generate(self, spec: GenerationSpec, adapter_path: str | None = None) -> list[Image.Image]:
        """Images for `spec`; a `spec.lora` adapter is loaded from `adapter_path` on first use."""
        embeds = self.text.encode(prompts_of(spec))
        latents = self.denoiser.denoise(denoise_job(spec, embeds, adapter_path))
        return self.vae.decode(latents, spec.height, spec.width)

    def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None,
             adapter_path: str | None = None) -> list[Image.Image]:
        """img2img (no mask) or inpainting of `image` (RGB) for `spec`: the graph's edit path in one process.
        `mask` is an "L" image, non-zero where the image is repainted (diffusers' convention); both are resized
        to the spec's size as the diffusers pipelines resize them."""
        embeds = self.text.encode(prompts_of(spec))
        start = self.vae.encode_for_seeds(image, spec.seeds, spec.height, spec.width)
        mask_pixels = None
        if mask is not None:
            mask_pixels = np.asarray(resize_for_model(mask.convert("L"), spec.width, spec.height))
        latents = self.denoiser.denoise_from_image(
            denoise_job(spec, embeds, adapter_path), start, spec.strength, mask_pixels
        )
        return self.vae.decode(latents, spec.height, spec.width)

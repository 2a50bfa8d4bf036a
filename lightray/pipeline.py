"""The three stages composed in one process: the CLI's offline mode, the benchmark's baseline, and the
reference the Serve graph is tested against."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
from PIL import Image

from lightray.config import ModelPreset, load_preset
from lightray.contracts import TextEmbeddings
from lightray.edits import PreparedEdit, compose_edit, prepare_edit
from lightray.engine import DenoiseEngine
from lightray.engine.engine import ProgressCallback
from lightray.schemas import EditSpec, GenerationSpec
from lightray.stages import TextEncodeStage, VaeStage


class LocalPipeline:
    """Text encoder, denoising engine and VAE in this process. The engine runs no loop thread here: the calling
    thread drives its steps, so requests made from several threads at once are batched together."""

    def __init__(self, preset: ModelPreset | str | None = None):
        self.preset = load_preset(preset) if preset is not None else load_preset()
        self.text = TextEncodeStage(self.preset)
        self.denoiser = DenoiseEngine(self.preset)
        self.vae = VaeStage(self.preset)

    def encode(self, spec: GenerationSpec) -> TextEmbeddings:
        self.text.check_prompts(spec.prompt, spec.negative_prompt)
        embeds = self.text.encode(spec.prompts())
        return TextEmbeddings(prompt=embeds[0], negative=embeds[1] if len(embeds) > 1 else None)

    def generate(self, spec: GenerationSpec, adapter_paths: Mapping[str, str] | None = None,
                 on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None
                 ) -> list[Image.Image]:
        """Images for `spec`; `adapter_paths` gives the local files of `spec.adapters` not loaded yet, by
        `AdapterUse.key`.
        `on_progress` gets every step's `StepProgress` (with previews at `spec.preview_steps()`); setting
        `cancel` stops the run at the next step (`DenoiseCancelled`)."""
        latents = self.denoiser.denoise(spec.denoise_params(), self.encode(spec), adapter_paths=adapter_paths,
                                        cancel=cancel, on_progress=on_progress)
        return self.vae.decode(latents, spec.height, spec.width)

    def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None,
             adapter_paths: Mapping[str, str] | None = None, on_progress: ProgressCallback | None = None,
             cancel: threading.Event | None = None) -> list[Image.Image]:
        """img2img (no mask) or inpainting of `image` for `spec`, as the service answers it: `image` and `mask` as
        uploaded (any size; `mask` "L", non-zero where the image is repainted, diffusers' convention), prepared
        and the outputs composed by `lightray.edits` (resize or `padding_mask_crop`, `mask_blur`, the
        `keep_unmasked` overlay). `on_progress`, `cancel`: as `generate`."""
        prepared = prepare_edit(image, mask, spec)
        return compose_edit(self.edit_outputs(spec, prepared, adapter_paths, on_progress, cancel), prepared)

    def edit_outputs(self, spec: EditSpec, prepared: PreparedEdit, adapter_paths: Mapping[str, str] | None = None,
                     on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None
                     ) -> list[Image.Image]:
        """The model's outputs for a prepared edit (spec-size images, not yet composed): the graph's edit path in
        one process. The in-process backend streams these and composes them as the graph's backend does."""
        start = self.vae.encode_for_seeds(prepared.image, spec.seeds, spec.height, spec.width)
        mask_pixels = None if prepared.mask is None else np.asarray(prepared.mask)
        latents = self.denoiser.denoise(spec.denoise_params(), self.encode(spec), image=start, mask=mask_pixels,
                                        adapter_paths=adapter_paths, cancel=cancel, on_progress=on_progress)
        return self.vae.decode(latents, spec.height, spec.width)

    def instruct(self, spec: GenerationSpec, images: list[Image.Image], adapter_paths: Mapping[str, str] | None = None,
                 on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None
                 ) -> list[Image.Image]:
        """An instruction edit (a model whose family takes condition images: `QwenImageEditPlusPipeline`, the 2.1
        pipelines): `spec`'s prompt is the instruction about `images` (1-3, RGB, any size), each image's condition
        tokens encoded by the VAE and its pixels read by the VL encoder with the prompt. `on_progress`, `cancel`:
        as `generate`."""
        text = self.text.encode_instruction(spec.prompts(), images, spec.width, spec.height)
        condition = self.vae.encode_conditions(images, spec.width, spec.height)
        latents = self.denoiser.denoise(spec.denoise_params(), text, condition=condition, adapter_paths=adapter_paths,
                                        cancel=cancel, on_progress=on_progress)
        return self.vae.decode(latents, spec.height, spec.width)

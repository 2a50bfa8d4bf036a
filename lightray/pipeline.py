"""The three stages composed in one process: the CLI's offline mode, the benchmark's baseline, and the
reference the Serve graph is tested against."""

from __future__ import annotations

from PIL import Image

from lightray.config import ModelPreset, load_preset
from lightray.schemas import GenerationSpec
from lightray.stages import DenoiseJob, DenoiseStage, TextEncodeStage, VaeStage


def denoise_job(spec: GenerationSpec, embeds: list | None = None, adapter: str | None = None,
                adapter_scale: float = 1.0) -> DenoiseJob:
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
        adapter=adapter,
        adapter_scale=adapter_scale,
    )


def prompts_of(spec: GenerationSpec) -> list[str]:
    return [spec.prompt] if spec.negative_prompt is None else [spec.prompt, spec.negative_prompt]


class LocalPipeline:
    def __init__(self, preset: ModelPreset | str | None = None):
        self.preset = load_preset(preset) if preset is not None else load_preset()
        self.text = TextEncodeStage(self.preset)
        self.denoiser = DenoiseStage(self.preset)
        self.vae = VaeStage(self.preset)

    def generate(self, spec: GenerationSpec) -> list[Image.Image]:
        embeds = self.text.encode(prompts_of(spec))
        latents = self.denoiser.denoise(denoise_job(spec, embeds))
        return self.vae.decode(latents, spec.height, spec.width)

from __future__ import annotations

from ray import serve

from deployments.timing import timed
from lightray.config import load_preset
from lightray.stages import DenoiseJob, DenoiseStage


@serve.deployment(name="Denoiser", max_ongoing_requests=4)
class Denoiser:
    def __init__(self, preset: dict):
        self.stage = DenoiseStage(load_preset(preset))

    def denoise(self, job: DenoiseJob, encoded: dict) -> dict:
        """Text-encoder output + job → {"latents": packed array, "timings": {…}}. `encoded` arrives straight from
        the TextEncoder (the ingress passes its response along), so embeddings never detour via the ingress."""
        timings = dict(encoded["timings"])
        embeds = encoded["embeds"]
        job.prompt_embeds = embeds[0]
        job.negative_embeds = embeds[1] if len(embeds) > 1 else None
        with timed(timings, "denoise_ms"):
            latents = self.stage.denoise(job)
        return {"latents": latents, "timings": timings}

    def check_health(self) -> None:
        if self.stage.pipe.transformer is None:
            raise RuntimeError("transformer not loaded")

from __future__ import annotations

import numpy as np
from PIL import Image
from ray import serve

from deployments.timing import timed
from lightray.config import load_preset
from lightray.images import encode_png
from lightray.stages import VaeStage


@serve.deployment(name="VaeDecoder", max_ongoing_requests=8)
class VaeDecoder:
    def __init__(self, preset: dict):
        self.stage = VaeStage(load_preset(preset))

    def decode(self, denoised: dict, width: int, height: int) -> dict:
        """Denoiser output → {"images": [PNG bytes], "timings": {…}}. PNG encoding happens here: compressed
        bytes are a smaller hop than raw pixels, and it spreads CPU work away from the ingress."""
        timings = dict(denoised["timings"])
        latents: np.ndarray = denoised["latents"]
        with timed(timings, "decode_ms"):
            images = self.stage.decode(latents, height, width)
        with timed(timings, "png_ms"):
            pngs = [encode_png(im) for im in images]
        return {"images": pngs, "timings": timings}

    def encode(self, image: np.ndarray, seeds: list[int], width: int, height: int) -> dict:
        """An input image (uint8 [h, w, 3]) → {"latents": [n, tokens, 64], "generator_states", "timings"}: the
        denoiser's starting point for img2img / inpainting (`VaeStage.encode_for_seeds`). A method of this
        deployment rather than a deployment of its own: the VAE's weights are already here, and on the embedded
        model an encode costs about as much as a handle hop (see docs/image_inputs.md)."""
        timings: dict[str, float] = {}
        with timed(timings, "vae_encode_ms"):
            start = self.stage.encode_for_seeds(Image.fromarray(image), seeds, height, width)
        return {"latents": start.latents, "generator_states": start.generator_states, "timings": timings}

    def check_health(self) -> None:
        if self.stage.vae is None:
            raise RuntimeError("vae not loaded")

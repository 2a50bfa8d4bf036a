from __future__ import annotations

import numpy as np
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

    def check_health(self) -> None:
        if self.stage.vae is None:
            raise RuntimeError("vae not loaded")

from __future__ import annotations

import numpy as np
from PIL import Image
from ray import serve

from deployments.metrics import handoff_at, log_request, record_queue_wait, record_stages
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
        record_queue_wait("decode", timings, denoised.get("handoff_at"))
        latents: np.ndarray = denoised["latents"]
        with timed(timings, "decode_ms"):
            images = self.stage.decode(latents, height, width)
        with timed(timings, "png_ms"):
            pngs = [encode_png(im) for im in images]
        record_stages(timings, "decode_ms", "png_ms")
        log_request("decode", images=len(pngs), size=f"{width}x{height}", wait_ms=timings.get("decode_wait_ms"),
                    decode_ms=timings["decode_ms"], png_ms=timings["png_ms"])
        return {"images": pngs, "timings": timings}

    def encode(self, image: np.ndarray, seeds: list[int], width: int, height: int,
               handoff: float | None = None) -> dict:
        """An input image (uint8 [h, w, 3]) → {"latents": [n, tokens, 64], "generator_states", "timings"}: the
        denoiser's starting point for img2img / inpainting (`VaeStage.encode_for_seeds`). Here rather than in the
        Denoiser: on the embedded model a 64x64 encode takes 3–5 times a handle hop, time the (scarcer) denoiser
        would otherwise spend, and it runs concurrently with the text encoder. Here rather than in a deployment of
        its own: that would cost the same hop plus a second copy of the VAE (docs/image_inputs.md). `handoff`: when
        the ingress sent the request (wall-clock s), for the queue-wait metric."""
        timings: dict[str, float] = {}
        record_queue_wait("vae_encode", timings, handoff)
        with timed(timings, "vae_encode_ms"):
            start = self.stage.encode_for_seeds(Image.fromarray(image), seeds, height, width)
        record_stages(timings, "vae_encode_ms")
        log_request("vae_encode", images=len(seeds), size=f"{width}x{height}",
                    wait_ms=timings.get("vae_encode_wait_ms"), vae_encode_ms=timings["vae_encode_ms"])
        return {"latents": start.latents, "generator_states": start.generator_states, "timings": timings,
                "handoff_at": handoff_at()}

    def check_health(self) -> None:
        if self.stage.vae is None:
            raise RuntimeError("vae not loaded")

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
from ray import serve

from deployments.timing import timed
from lightray.adapters import open_registry
from lightray.config import load_preset
from lightray.stages import DenoiseCancelled, DenoiseJob, DenoiseStage
from lightray.stages.vae import ImageLatents

logger = logging.getLogger("ray.serve")


class LoadedAdapter:
    """What the multiplexer caches per tenant adapter: its local files, and the stage to unload it from.
    Ray Serve calls `__del__` when the LRU evicts it."""

    def __init__(self, stage: DenoiseStage, ref: str, path: str):
        self.stage, self.ref, self.path = stage, ref, path

    def __del__(self):
        self.stage.unload_adapter(self.ref)


def _log_cancelled(done: asyncio.Future) -> None:
    err = done.exception() if not done.cancelled() else None
    if isinstance(err, DenoiseCancelled):
        logger.info("denoise %s (request cancelled)", err)
    elif err is None:
        logger.info("denoise finished after its request was cancelled")


@serve.deployment(name="Denoiser", max_ongoing_requests=4)
class Denoiser:
    def __init__(self, preset: dict, registry: str = "./registry", registry_storage_options: dict | None = None,
                 adapter_cache_size: int = 4):
        self.preset = load_preset(preset)
        self.stage = DenoiseStage(self.preset)
        self.registry = open_registry(registry, registry_storage_options)

        async def load_adapter(ref: str) -> LoadedAdapter:
            # Download + checksum off the event loop; the LoRA itself is loaded into the pipeline on first use
            # inside the stage's lock (so it never races a running denoise).
            manifest, path = await asyncio.to_thread(
                self.registry.fetch, ref, base_model_id=self.preset.base_model_id
            )
            logger.info("adapter %s fetched to %s", manifest.ref, path)
            return LoadedAdapter(self.stage, ref, str(path))

        # Wrapped at init so the per-replica LRU size comes from the Serve config.
        self._adapters = serve.multiplexed(max_num_models_per_replica=adapter_cache_size)(load_adapter)

    async def _complete(self, job: DenoiseJob, encoded: dict, timings: dict) -> None:
        """Fill the job from the TextEncoder's output and, for a tenant adapter, from the multiplexed cache."""
        embeds = encoded["embeds"]
        job.prompt_embeds = embeds[0]
        job.negative_embeds = embeds[1] if len(embeds) > 1 else None
        if job.adapter:
            with timed(timings, "adapter_ms"):
                adapter = await self._adapters(serve.get_multiplexed_model_id() or job.adapter)
            job.adapter_path = adapter.path

    async def denoise(self, job: DenoiseJob, encoded: dict) -> dict:
        """Text-encoder output + job → {"latents": packed array, "timings": {…}}. `encoded` arrives straight from
        the TextEncoder (the ingress passes its response along), so embeddings never detour via the ingress."""
        timings = dict(encoded["timings"])
        await self._complete(job, encoded, timings)
        with timed(timings, "denoise_ms"):
            latents = await self._cancellable(self.stage.denoise, job)
        return {"latents": latents, "timings": timings}

    async def denoise_image(self, job: DenoiseJob, encoded: dict, image: dict, strength: float,
                            mask: np.ndarray | None = None) -> dict:
        """img2img / inpainting: text-encoder output + the VaeDecoder's `encode` output (both passed handle to
        handle) + job → {"latents", "timings"}, like `denoise`. `mask`: uint8 [height, width], non-zero = edit."""
        timings = {**encoded["timings"], **image["timings"]}
        await self._complete(job, encoded, timings)
        start = ImageLatents(image["latents"], image["generator_states"])
        with timed(timings, "denoise_ms"):
            latents = await self._cancellable(self.stage.denoise_from_image, job, start, strength, mask)
        return {"latents": latents, "timings": timings}

    async def _cancellable(self, work, *args):
        """Run stage work in a thread. When Serve cancels the request (the ingress gave up on it at its timeout,
        or the client went away), the work stops after its current step instead of holding the stage (and every
        request queued behind it) until it would have finished."""
        cancel = threading.Event()
        running = asyncio.ensure_future(asyncio.to_thread(work, *args, cancel=cancel))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            cancel.set()
            running.add_done_callback(_log_cancelled)
            raise

    def check_health(self) -> None:
        if self.stage.pipe.transformer is None:
            raise RuntimeError("transformer not loaded")

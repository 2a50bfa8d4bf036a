from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
from ray import serve

from deployments.metrics import (
    handoff_at,
    keep_reporting,
    log_request,
    record_queue_wait,
    record_stages,
    stage_metrics,
)
from deployments.timing import timed
from lightray.adapters import open_registry
from lightray.config import load_preset
from lightray.stages import DenoiseCancelled, DenoiseJob, DenoiseStage
from lightray.stages.vae import ImageLatents

logger = logging.getLogger("ray.serve")


class LoadedAdapter:
    """What the multiplexer caches per tenant adapter: its local files, and the stage to unload it from.
    Ray Serve calls `__del__` when the LRU evicts it, then drops it, so Python calls `__del__` a second time
    when it collects the object: `release` runs once (a late second unload could otherwise drop the same ref
    loaded again for a newer cache entry)."""

    def __init__(self, stage: DenoiseStage, ref: str, path: str, on_release=None):
        self.stage, self.ref, self.path = stage, ref, path
        self.claimed = False
        """Set by the first request served with this entry (the one whose lookup loaded it: a miss)."""
        self._on_release = on_release
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.stage.unload_adapter(self.ref)
        if self._on_release is not None:
            self._on_release(self)

    def __del__(self):
        self.release()


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
        self.metrics = stage_metrics()
        self._adapters_held = 0
        keep_reporting(self.metrics.adapters_loaded, lambda: self._adapters_held, "lightray_adapters_loaded")

        def released(adapter: LoadedAdapter) -> None:
            self._adapters_held -= 1
            self.metrics.adapter_evictions.inc()
            self.metrics.adapters_loaded.set(self._adapters_held)
            logger.info("adapter %s evicted from this replica's cache", adapter.ref)

        async def load_adapter(ref: str) -> LoadedAdapter:
            # Download + checksum off the event loop; the LoRA itself is loaded into the pipeline on first use
            # inside the stage's lock (so it never races a running denoise).
            self.metrics.adapter_misses.inc()
            manifest, path = await asyncio.to_thread(
                self.registry.fetch, ref, base_model_id=self.preset.base_model_id
            )
            logger.info("adapter %s fetched to %s", manifest.ref, path)
            adapter = LoadedAdapter(self.stage, ref, str(path), on_release=released)
            self._adapters_held += 1
            self.metrics.adapters_loaded.set(self._adapters_held)
            return adapter

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
            if adapter.claimed:  # loaded for an earlier request; the one that loaded it was the miss
                self.metrics.adapter_hits.inc()
            adapter.claimed = True
            job.adapter_path = adapter.path

    def _done(self, job: DenoiseJob, kind: str, latents, timings: dict) -> dict:
        """Metrics and the log line of a finished denoise call; the output for the VaeDecoder."""
        n, model = len(job.seeds), job.variant or "default"
        record_stages(timings, "adapter_ms", "denoise_ms")
        self.metrics.batch_size.observe(n, tags={"model": model})
        self.metrics.images.inc(n, tags={"model": model, "kind": kind})
        log_request("denoise", kind=kind, model=model, images=n, steps=job.num_inference_steps,
                    size=f"{job.width}x{job.height}", adapter=job.adapter, wait_ms=timings.get("denoise_wait_ms"),
                    adapter_ms=timings.get("adapter_ms"), denoise_ms=timings["denoise_ms"])
        return {"latents": latents, "timings": timings, "handoff_at": handoff_at()}

    async def denoise(self, job: DenoiseJob, encoded: dict) -> dict:
        """Text-encoder output + job → {"latents": packed array, "timings": {…}, "handoff_at"}. `encoded` arrives
        straight from the TextEncoder (the ingress passes its response along), so embeddings never detour via the
        ingress."""
        timings = dict(encoded["timings"])
        record_queue_wait("denoise", timings, encoded.get("handoff_at"))
        await self._complete(job, encoded, timings)
        with timed(timings, "denoise_ms"):
            latents = await self._cancellable(self.stage.denoise, job)
        return self._done(job, "text", latents, timings)

    async def denoise_image(self, job: DenoiseJob, encoded: dict, image: dict, strength: float,
                            mask: np.ndarray | None = None) -> dict:
        """img2img / inpainting: text-encoder output + the VaeDecoder's `encode` output (both passed handle to
        handle) + job → {"latents", "timings"}, like `denoise`. `mask`: uint8 [height, width], non-zero = edit."""
        timings = {**encoded["timings"], **image["timings"]}
        handoffs = [h for h in (encoded.get("handoff_at"), image.get("handoff_at")) if h is not None]
        record_queue_wait("denoise", timings, max(handoffs) if handoffs else None)  # from the later input
        await self._complete(job, encoded, timings)
        start = ImageLatents(image["latents"], image["generator_states"])
        with timed(timings, "denoise_ms"):
            latents = await self._cancellable(self.stage.denoise_from_image, job, start, strength, mask)
        return self._done(job, "image", latents, timings)

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

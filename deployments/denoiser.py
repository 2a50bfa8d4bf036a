"""The Denoiser deployment: a thin async shell over one `DenoiseEngine` per replica.

Requests do not wait for each other here: each call fetches its adapters (Serve's model multiplexing, an LRU per
replica), submits to the engine and awaits its future, while the engine's loop thread batches every live request
at step level. `max_ongoing_requests` in the Serve config is therefore what the engine can hold, not 1-2.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import numpy as np
from ray import serve

from deployments.metrics import (
    keep_reporting,
    log_request,
    record_queue_wait,
    record_stages,
    request_id,
    stage_metrics,
)
from lightray.adapter_files import HeldFiles
from lightray.adapters import can_use, checkout_for_preset
from lightray.registry import AdapterManifest, AdapterNotFound
from lightray.registry_settings import open_registry
from lightray.config import load_preset
from lightray.contracts import (
    AdapterUse,
    ConditionLatents,
    DenoisedLatents,
    DenoiseParams,
    ImageLatents,
    OutputEncoding,
    StepProgress,
    TextEmbeddings,
)
from lightray.engine import DenoiseCancelled, DenoiseEngine, EngineConfig, EngineRequest, StepStats
from lightray.engine.engine import ProgressCallback
from lightray.images import encode_image
from lightray.stages.preview import shipped_preview

logger = logging.getLogger("ray.serve")


class LoadedAdapter:
    """What the multiplexer caches per tenant adapter (keyed on `AdapterUse.key`: ref and manifest checksum): its
    manifest, its local files (held in the file cache, so no process evicts them meanwhile), and the engine to
    evict it from. Ray Serve calls `__del__` when the LRU evicts it, then drops it, so Python calls `__del__` a
    second time when it collects the object: `release` runs once (a late second eviction could otherwise drop the
    same key loaded again for a newer cache entry). The engine defers the eviction while a live request uses it;
    the files become evictable from the disk cache at once (the engine has read them when it loaded them, and a
    reload goes through a new entry, which fetches them again)."""

    def __init__(self, engine: DenoiseEngine, key: str, manifest: AdapterManifest, files: HeldFiles,
                 on_release=None):
        self.engine, self.key, self.manifest, self.files = engine, key, manifest, files
        self.path = str(files.path)
        self.claimed = False
        """Set by the first request served with this entry (the one whose lookup loaded it: a miss)."""
        self._on_release = on_release
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.engine.unload_adapter(self.key)
        self.files.release()
        if self._on_release is not None:
            self._on_release(self)

    def __del__(self):
        self.release()


@serve.deployment(name="Denoiser")
class Denoiser:
    def __init__(self, preset: dict, registry: str = "./registry", registry_storage_options: dict | None = None,
                 adapter_cache_size: int = 4, engine: dict | None = None, registry_settings: dict | None = None):
        """`registry_settings`: the other `RegistrySettings` fields (manifest cache TTL, file cache bound)."""
        self.preset = load_preset(preset)
        self.metrics = stage_metrics()
        self.engine = DenoiseEngine(self.preset, EngineConfig(**(engine or {})), on_step=self._observe_step).start()
        # Fast previews made here, where the latents are, when the model ships a preview decoder (a few hundred
        # microseconds at 128²); otherwise the ingress sends the latents to the VaeDecoder.
        self.preview = shipped_preview(self.preset)
        self.registry = open_registry(registry, registry_storage_options, **(registry_settings or {}))
        self._adapters_held = 0
        keep_reporting(self.metrics.adapters_loaded, lambda: self._adapters_held, "lightray_adapters_loaded")

        def released(adapter: LoadedAdapter) -> None:
            self._adapters_held -= 1
            self.metrics.adapter_evictions.inc()
            self.metrics.adapters_loaded.set(self._adapters_held)
            logger.info("adapter %s evicted from this replica's cache", adapter.key)

        async def fetch_adapter(key: str) -> LoadedAdapter:
            # Download + checksum off the event loop; the engine loads the LoRA into the transformer at a step
            # boundary when the first request that names it is admitted. A key whose checksum is no longer the
            # registry's manifest's is refused (AdapterNotFound): that version is gone.
            self.metrics.adapter_misses.inc()
            manifest, files = await asyncio.to_thread(checkout_for_preset, self.registry, AdapterUse.from_key(key),
                                                      self.preset)
            logger.info("adapter %s fetched to %s", manifest.ref, files.path)
            adapter = LoadedAdapter(self.engine, key, manifest, files, on_release=released)
            self._adapters_held += 1
            self.metrics.adapters_loaded.set(self._adapters_held)
            return adapter

        # Wrapped at init so the per-replica LRU size comes from the Serve config.
        self._adapters = serve.multiplexed(max_num_models_per_replica=adapter_cache_size)(fetch_adapter)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's replica-reported autoscaling metric: seconds of queued and live work here, from the engine's
        measured step-time curve (deployments/autoscaling.py's `WorkSecondsPolicy` scales on it)."""
        return {"work_s": self.engine.load_seconds()}

    def _observe_step(self, stats: StepStats) -> None:
        self.metrics.engine_step_rows.observe(stats.rows)

    async def _adapter_paths(self, params: DenoiseParams, timings: dict) -> dict[str, str]:
        paths = {}
        start = asyncio.get_running_loop().time()
        for use in params.adapters:
            adapter = await self._adapters(use.key)
            if not can_use(adapter.manifest, params.tenant):
                # The ingress checked it too; this replica does not trust a pin it did not make (a stale or
                # mistaken one): another tenant's private adapter is answered as absent, as at the ingress.
                raise AdapterNotFound(f"adapter {use.ref} not found")
            if adapter.claimed:  # loaded for an earlier request; the one that loaded it was the miss
                self.metrics.adapter_hits.inc()
            adapter.claimed = True
            paths[use.key] = adapter.path
        if params.adapters:
            timings["adapter_ms"] = (asyncio.get_running_loop().time() - start) * 1000
        return paths

    async def denoise(self, params: DenoiseParams, text: TextEmbeddings, image: ImageLatents | None = None,
                      mask: np.ndarray | None = None, condition: ConditionLatents | None = None) -> DenoisedLatents:
        """Text embeddings (+ for img2img / inpainting the VaeDecoder's image latents, and `mask`: uint8
        [height, width], non-zero = repaint; + for an instruction edit the VaeDecoder's condition latents) →
        packed latents. `text`, `image` and `condition` arrive straight from the TextEncoder and VaeDecoder (the
        ingress passes their responses along), never via the ingress."""
        request, timings, start = await self._submit(params, text, image, mask, condition=condition)
        try:
            latents = await asyncio.shield(asyncio.wrap_future(request.future))
        except asyncio.CancelledError:
            _cancel(request)
            raise
        return self._finished(params, image, request, timings, start, latents)

    async def denoise_stream(self, params: DenoiseParams, text: TextEmbeddings, image: ImageLatents | None = None,
                             mask: np.ndarray | None = None, condition: ConditionLatents | None = None,
                             preview_encoding: OutputEncoding | None = None
                             ) -> AsyncIterator[StepProgress | DenoisedLatents]:
        """`denoise` as a stream (call it through a handle with `.options(stream=True)`): a `StepProgress` after
        every step (with the x0-prediction at `params.preview_steps`), then the `DenoisedLatents`, which are the
        ones `denoise` returns for the same request. Closing the stream (the ingress's client went away)
        cancels the request. With `preview_encoding` (fast previews) and a model that ships a preview decoder,
        each preview comes made and encoded (`StepProgress.preview_images`) instead of as latents."""
        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[StepProgress | None] = asyncio.Queue()

        def on_progress(progress: StepProgress) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(reports.put_nowait, progress)

        request, timings, start = await self._submit(params, text, image, mask, on_progress, condition)
        # Queued after every report (the engine reports a step before it finishes the request): None ends them.
        request.future.add_done_callback(lambda _: loop.call_soon_threadsafe(reports.put_nowait, None))
        try:
            while (progress := await reports.get()) is not None:
                if progress.preview is not None and preview_encoding is not None and self.preview is not None:
                    images = self.preview.images(progress.preview, params.height, params.width)
                    progress = dataclasses.replace(progress, preview=None, preview_images=tuple(
                        encode_image(im, preview_encoding) for im in images))
                yield progress
            latents = await asyncio.wrap_future(request.future)
        except (asyncio.CancelledError, GeneratorExit):
            _cancel(request)
            raise
        yield self._finished(params, image, request, timings, start, latents)

    async def _submit(self, params: DenoiseParams, text: TextEmbeddings, image: ImageLatents | None,
                      mask: np.ndarray | None, on_progress: ProgressCallback | None = None,
                      condition: ConditionLatents | None = None) -> tuple[EngineRequest, dict, float]:
        """Fetch the request's adapters and hand it to the engine: (its `EngineRequest`, timings, start time)."""
        timings = dict(text.timings)
        inputs = [x for x in (image, condition) if x is not None]
        for x in inputs:
            timings.update(x.timings)
        handoffs = [h for h in (text.handoff_at, *(x.handoff_at for x in inputs)) if h is not None]
        record_queue_wait("denoise", timings, max(handoffs) if handoffs else None)  # from the later input
        paths = await self._adapter_paths(params, timings)
        start = asyncio.get_running_loop().time()
        request = self.engine.submit(params, text, image, mask, paths, on_progress, condition)  # ~1 ms, no hop
        return request, timings, start

    def _finished(self, params: DenoiseParams, image: ImageLatents | None, request: EngineRequest, timings: dict,
                  start: float, latents: np.ndarray) -> DenoisedLatents:
        """The request's output, with its timings recorded and logged."""
        timings["denoise_ms"] = (asyncio.get_running_loop().time() - start) * 1000
        if request.first_step_at is not None:
            timings["denoise_queue_ms"] = (request.first_step_at - request.submitted_at) * 1000
        kind, model = "image" if image is not None else "text", params.variant or "default"
        record_stages(timings, "adapter_ms", "denoise_ms")
        self.metrics.batch_size.observe(params.n, tags={"model": model})
        self.metrics.images.inc(params.n, tags={"model": model, "kind": kind})
        log_request("denoise", kind=kind, model=model, images=params.n, steps=request.total_steps,
                    size=f"{params.width}x{params.height}", priority=params.priority,
                    adapters=",".join(a.ref for a in params.adapters) or None, paused_steps=request.paused_steps,
                    wait_ms=timings.get("denoise_wait_ms"), queue_ms=timings.get("denoise_queue_ms"),
                    adapter_ms=timings.get("adapter_ms"), denoise_ms=timings["denoise_ms"],
                    request=params.request_id or request_id() or None)
        return DenoisedLatents(latents, timings, time.time())

    async def check_health(self) -> None:
        # A one-token forward at the engine's next step boundary (DenoiseEngine.check_health); it waits up to a
        # step, so off the event loop.
        await asyncio.to_thread(self.engine.check_health)


def _cancel(request: EngineRequest) -> None:
    """The ingress gave up (timeout, client gone): the engine drops the request at the next step."""
    request.cancel()
    request.future.add_done_callback(_log_cancelled)


def _log_cancelled(done) -> None:
    err = done.exception() if not done.cancelled() else None
    if isinstance(err, DenoiseCancelled):
        logger.info("denoise %s (request cancelled)", err)
    elif err is None:
        logger.info("denoise finished after its request was cancelled")

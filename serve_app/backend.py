"""What the HTTP layer needs from a generation graph, and its two implementations: the Ray Serve graph
(`RayGraphBackend`, production) and the in-process pipeline (`LocalBackend`, API tests without a cluster)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Protocol

import numpy as np
from PIL import Image

from lightray.config import ModelPreset
from lightray.images import encode_png
from lightray.pipeline import LocalPipeline, denoise_job, prompts_of
from lightray.registry import AdapterRegistry
from lightray.schemas import EditSpec, GenerationSpec


class ServiceUnavailable(Exception):
    """The graph cannot take this request now (queues full, a stage down); the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 2):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass
class GenerationResult:
    images: list[bytes]
    """PNG bytes, one per seed, in seed order."""
    timings: dict[str, float]
    """Milliseconds per stage (encode_ms, denoise_ms, decode_ms, png_ms, graph_ms)."""


class GenerationBackend(Protocol):
    preset: ModelPreset

    async def generate(self, spec: GenerationSpec) -> GenerationResult: ...

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        """img2img (no mask) or inpainting; `image` RGB and `mask` "L" (255 = edit), both at the spec's size."""
        ...

    async def readiness(self) -> dict[str, bool]: ...


class LocalBackend:
    """All three stages in this process, one request at a time (the pipeline object is not re-entrant)."""

    def __init__(self, pipeline: LocalPipeline, registry: AdapterRegistry | None = None):
        self.pipeline = pipeline
        self.preset = pipeline.preset
        self.registry = registry
        self._lock = threading.Lock()

    def _run(self, spec: GenerationSpec) -> GenerationResult:
        with self._lock:
            start = time.perf_counter()
            adapter_path = None
            if spec.lora:
                if self.registry is None:
                    raise RuntimeError("this backend has no adapter registry")
                _, path = self.registry.fetch(spec.lora, base_model_id=self.preset.base_model_id)
                adapter_path = str(path)
            images = self.pipeline.generate(spec, adapter_path)
            pngs = [encode_png(im) for im in images]
        return GenerationResult(pngs, {"graph_ms": (time.perf_counter() - start) * 1000})

    async def generate(self, spec: GenerationSpec) -> GenerationResult:
        return await asyncio.to_thread(self._run, spec)

    def _run_edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None) -> GenerationResult:
        with self._lock:
            start = time.perf_counter()
            adapter_path = None
            if spec.lora:  # as in `_run`
                if self.registry is None:
                    raise RuntimeError("this backend has no adapter registry")
                _, path = self.registry.fetch(spec.lora, base_model_id=self.preset.base_model_id)
                adapter_path = str(path)
            images = self.pipeline.edit(spec, image, mask, adapter_path)
            pngs = [encode_png(im) for im in images]
        return GenerationResult(pngs, {"graph_ms": (time.perf_counter() - start) * 1000})

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        return await asyncio.to_thread(self._run_edit, spec, image, mask)

    async def readiness(self) -> dict[str, bool]:
        return {"TextEncoder": True, "Denoiser": True, "VaeDecoder": True}


async def _cancelling(final, *upstream):
    """Await the graph's last response; if the caller gives up on it (the request timeout, a disconnect), cancel
    every stage's request too, so replicas stop work nobody will read (the Denoiser stops within a step)."""
    try:
        return await final
    except asyncio.CancelledError:
        for response in (final, *upstream):
            response.cancel()
        raise


class RayGraphBackend:
    """Chains the stage deployments' responses handle to handle: each stage's output goes straight to the next
    replica as an argument, so the ingress never holds embeddings or latents."""

    def __init__(self, preset: ModelPreset, text_encoder, denoiser, vae):
        self.preset = preset
        self.text_encoder, self.denoiser, self.vae = text_encoder, denoiser, vae

    async def generate(self, spec: GenerationSpec) -> GenerationResult:
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            return await self._generate(spec)
        except BackPressureError:
            raise ServiceUnavailable("the service is at capacity; retry shortly", retry_after_s=2) from None
        except (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError) as err:
            raise ServiceUnavailable(f"a stage is unavailable ({type(err).__name__}); retry shortly",
                                     retry_after_s=5) from None

    async def _generate(self, spec: GenerationSpec) -> GenerationResult:
        start = time.perf_counter()
        # `handoff`: wall-clock send time, from which the stage measures its queue wait (deployments/metrics.py).
        encoded = self.text_encoder.encode.remote(prompts_of(spec), handoff=time.time())
        denoiser = self.denoiser
        if spec.lora:
            # Routes to a replica that already holds this adapter when there is one.
            denoiser = denoiser.options(multiplexed_model_id=spec.lora)
        denoised = denoiser.denoise.remote(denoise_job(spec), encoded)
        result = await _cancelling(self.vae.decode.remote(denoised, spec.width, spec.height), encoded, denoised)
        timings = dict(result["timings"])
        timings["graph_ms"] = (time.perf_counter() - start) * 1000
        return GenerationResult(result["images"], timings)

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:  # as in `generate`
            return await self._edit(spec, image, mask)
        except BackPressureError:
            raise ServiceUnavailable("the service is at capacity; retry shortly", retry_after_s=2) from None
        except (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError) as err:
            raise ServiceUnavailable(f"a stage is unavailable ({type(err).__name__}); retry shortly",
                                     retry_after_s=5) from None

    async def _edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None) -> GenerationResult:
        """The text encoder and the VAE's encoder run concurrently; both responses go handle to handle into the
        denoiser, whose output goes to the VAE's decoder, as in `generate`."""
        start = time.perf_counter()
        encoded = self.text_encoder.encode.remote(prompts_of(spec), handoff=time.time())
        image_latents = self.vae.encode.remote(np.asarray(image.convert("RGB")), spec.seeds, spec.width, spec.height,
                                               handoff=time.time())
        denoiser = self.denoiser
        if spec.lora:
            denoiser = denoiser.options(multiplexed_model_id=spec.lora)
        denoised = denoiser.denoise_image.remote(
            denoise_job(spec), encoded, image_latents, spec.strength,
            None if mask is None else np.asarray(mask.convert("L")),
        )
        result = await _cancelling(self.vae.decode.remote(denoised, spec.width, spec.height),
                                   encoded, image_latents, denoised)
        timings = dict(result["timings"])
        timings["graph_ms"] = (time.perf_counter() - start) * 1000
        return GenerationResult(result["images"], timings)

    async def readiness(self) -> dict[str, bool]:
        """Each stage answers its own health check within 5 s (a replica still loading does not)."""
        stages = {"TextEncoder": self.text_encoder, "Denoiser": self.denoiser, "VaeDecoder": self.vae}

        async def healthy(handle) -> bool:
            try:
                await asyncio.wait_for(handle.check_health.remote(), timeout=5)
                return True
            except Exception:
                return False

        results = await asyncio.gather(*(healthy(h) for h in stages.values()))
        return dict(zip(stages, results))

"""What the HTTP layer needs from a generation graph, and its two implementations: the Ray Serve graph
(`RayGraphBackend`, production) and the in-process pipeline (`LocalBackend`, API tests without a cluster)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Protocol

from lightray.config import ModelPreset
from lightray.images import encode_png
from lightray.pipeline import LocalPipeline, denoise_job, prompts_of
from lightray.schemas import GenerationSpec


@dataclasses.dataclass
class GenerationResult:
    images: list[bytes]
    """PNG bytes, one per seed, in seed order."""
    timings: dict[str, float]
    """Milliseconds per stage (encode_ms, denoise_ms, decode_ms, png_ms, graph_ms)."""


class GenerationBackend(Protocol):
    preset: ModelPreset

    async def generate(self, spec: GenerationSpec) -> GenerationResult: ...

    async def readiness(self) -> dict[str, bool]: ...


class LocalBackend:
    """All three stages in this process, one request at a time (the pipeline object is not re-entrant)."""

    def __init__(self, pipeline: LocalPipeline):
        self.pipeline = pipeline
        self.preset = pipeline.preset
        self._lock = threading.Lock()

    def _run(self, spec: GenerationSpec) -> GenerationResult:
        with self._lock:
            start = time.perf_counter()
            images = self.pipeline.generate(spec)
            pngs = [encode_png(im) for im in images]
        return GenerationResult(pngs, {"graph_ms": (time.perf_counter() - start) * 1000})

    async def generate(self, spec: GenerationSpec) -> GenerationResult:
        return await asyncio.to_thread(self._run, spec)

    async def readiness(self) -> dict[str, bool]:
        return {"TextEncoder": True, "Denoiser": True, "VaeDecoder": True}


class RayGraphBackend:
    """Chains the stage deployments' responses handle to handle: each stage's output goes straight to the next
    replica as an argument, so the ingress never holds embeddings or latents."""

    def __init__(self, preset: ModelPreset, text_encoder, denoiser, vae):
        self.preset = preset
        self.text_encoder, self.denoiser, self.vae = text_encoder, denoiser, vae

    async def generate(self, spec: GenerationSpec) -> GenerationResult:
        start = time.perf_counter()
        encoded = self.text_encoder.encode.remote(prompts_of(spec))
        denoiser = self.denoiser
        if spec.lora:
            denoiser = denoiser.options(multiplexed_model_id=spec.lora)
        denoised = denoiser.denoise.remote(denoise_job(spec), encoded)
        result = await self.vae.decode.remote(denoised, spec.width, spec.height)
        timings = dict(result["timings"])
        timings["graph_ms"] = (time.perf_counter() - start) * 1000
        return GenerationResult(result["images"], timings)

    async def readiness(self) -> dict[str, bool]:
        from ray import serve

        status = serve.status()
        ready = {}
        for app in status.applications.values():
            for name, dep in app.deployments.items():
                ready[name] = dep.status == "HEALTHY"
        return ready

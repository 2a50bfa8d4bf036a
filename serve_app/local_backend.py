"""The generation graph in this process (`LocalBackend`): all three stages of a `lightray.pipeline.LocalPipeline`
behind the `GenerationBackend` interface, for API tests and benchmarks without a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from PIL import Image

from lightray.adapters import checkout_for_preset
from lightray.contracts import OutputEncoding, StepProgress
from lightray.edits import decoded_encoding
from lightray.images import encode_image
from lightray.registry import AdapterRegistry
from lightray.schemas import EditSpec, GenerationSpec
from serve_app.backend import GenerationResult, PartialImages, StepUpdate, StreamItem
from serve_app.edit_composition import composed_stream
from serve_app.graph_failures import client_errors

if TYPE_CHECKING:  # the ingress never loads torch; only LocalBackend's callers hold a pipeline
    from lightray.pipeline import LocalPipeline


class LocalBackend:
    """All three stages in this process. Requests made concurrently share the engine's steps (each caller's thread
    drives them in turn); adapter fetches happen in the caller's thread."""

    def __init__(self, pipeline: "LocalPipeline", registry: AdapterRegistry | None = None):
        self.pipeline = pipeline
        self.preset = pipeline.preset
        self.registry = registry

    def _run(self, spec: GenerationSpec | EditSpec, draw, encoding: OutputEncoding) -> GenerationResult:
        """Fetch the spec's adapters (if any, held in the file cache while they are drawn with),
        `draw(adapter_paths)` the images, encode them as `encoding`."""
        start = time.perf_counter()
        adapter_paths = {}
        with contextlib.ExitStack() as held:
            for use in spec.adapters:
                if self.registry is None:
                    raise RuntimeError("this backend has no adapter registry")
                _, files = checkout_for_preset(self.registry, use, self.preset)
                held.enter_context(files)
                adapter_paths[use.key] = str(files.path)
            pngs = [encode_image(im, encoding) for im in draw(adapter_paths)]
        return GenerationResult(pngs, {"graph_ms": (time.perf_counter() - start) * 1000})

    async def generate(self, spec: GenerationSpec) -> GenerationResult:
        draw = lambda adapter_paths: self.pipeline.generate(spec, adapter_paths)  # noqa: E731
        return await client_errors(spec, asyncio.to_thread(self._run, spec, draw, spec.output))

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        draw = lambda adapter_paths: self.pipeline.edit(spec, image, mask, adapter_paths)  # noqa: E731
        return await client_errors(spec, asyncio.to_thread(self._run, spec, draw, spec.output))

    def generate_stream(self, spec: GenerationSpec) -> AsyncIterator[StreamItem]:
        return self._stream(spec, lambda paths, on_progress, cancel: self.pipeline.generate(
            spec, paths, on_progress=on_progress, cancel=cancel), spec.output)

    async def instruct(self, spec: GenerationSpec, images: list[Image.Image]) -> GenerationResult:
        draw = lambda adapter_paths: self.pipeline.instruct(spec, images, adapter_paths)  # noqa: E731
        return await client_errors(spec, asyncio.to_thread(self._run, spec, draw, spec.output))

    def instruct_stream(self, spec: GenerationSpec, images: list[Image.Image]) -> AsyncIterator[StreamItem]:
        return self._stream(spec, lambda paths, on_progress, cancel: self.pipeline.instruct(
            spec, images, paths, on_progress=on_progress, cancel=cancel), spec.output)

    def edit_stream(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None
                    ) -> AsyncIterator[StreamItem]:
        return composed_stream(spec, image, mask, lambda prepared: self._stream(
            spec, lambda paths, on_progress, cancel: self.pipeline.edit_outputs(
                spec, prepared, paths, on_progress=on_progress, cancel=cancel),
            decoded_encoding(prepared, spec.output)))

    async def _stream(self, spec: GenerationSpec | EditSpec, draw: Callable,
                      encoding: OutputEncoding) -> AsyncIterator[StreamItem]:
        """Run `draw(adapter_paths, on_progress, cancel)` in a worker thread and yield its steps as they happen;
        previews are decoded in another thread, so the steps go on meanwhile. Images and previews are encoded as
        `encoding`."""
        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[StepProgress | None] = asyncio.Queue()
        cancel = threading.Event()

        def on_progress(progress: StepProgress) -> None:  # on the worker thread
            loop.call_soon_threadsafe(reports.put_nowait, progress)

        work = asyncio.ensure_future(client_errors(spec, asyncio.to_thread(
            self._run, spec, lambda paths: draw(paths, on_progress, cancel), encoding)))
        work.add_done_callback(lambda _: reports.put_nowait(None))  # after every report the thread queued
        finished = False
        try:
            previews = 0
            while (progress := await reports.get()) is not None:
                yield StepUpdate(progress.step, progress.total_steps)
                if progress.preview is not None:
                    pngs = await asyncio.to_thread(self._decode, progress.preview, spec, encoding)
                    yield PartialImages(previews, progress.step, pngs)
                    previews += 1
            result = await work
            finished = True
            yield result
        finally:
            if not finished:
                cancel.set()  # the engine drops the request at its next step

    def _decode(self, latents, spec: GenerationSpec, encoding: OutputEncoding) -> list[bytes]:
        """A preview's images, made as `spec.preview` says (as the VaeDecoder's `preview` / `decode` make them)."""
        vae = self.pipeline.vae
        make = vae.decode if spec.preview == "full" else vae.preview
        return [encode_image(im, encoding) for im in make(latents, spec.height, spec.width)]

    async def readiness(self) -> dict[str, bool]:
        return {"TextEncoder": True, "Denoiser": True, "VaeDecoder": True}

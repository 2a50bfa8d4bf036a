"""What the HTTP layer needs from a generation graph, and its two implementations: the Ray Serve graph
(`RayGraphBackend`, production) and the in-process pipeline (`LocalBackend`, API tests without a cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np
from PIL import Image

from lightray.adapters import checkout_for_preset
from lightray.config import ModelPreset
from lightray.contracts import AdapterLoadError, DenoisedLatents, EngineFull, OutputEncoding, StepProgress
from lightray.edits import (
    PreparedEdit,
    compose_preview_pngs,
    compose_pngs,
    decoded_encoding,
    prepare_edit,
    preview_frame,
)
from lightray.images import encode_image
from lightray.registry import AdapterCorrupt, AdapterNotFound, AdapterRegistry, AdapterRegistryError
from lightray.errors import NotFound, RequestError
from lightray.schemas import EditSpec, GenerationSpec
from serve_app.errors import AdapterUnavailable, ServiceUnavailable

if TYPE_CHECKING:  # the ingress never loads torch; only LocalBackend's callers hold a pipeline
    from lightray.pipeline import LocalPipeline


@dataclasses.dataclass
class GenerationResult:
    images: list[bytes]
    """Encoded image bytes (`spec.output`: PNG unless the request asked for JPEG or WebP), one per seed, in seed
    order."""
    timings: dict[str, float]
    """Milliseconds per stage (encode_ms, denoise_ms, decode_ms, png_ms, graph_ms; compose_ms for an edit whose
    outputs the ingress composes)."""


@dataclasses.dataclass(frozen=True)
class StepUpdate:
    """A streamed request finished a denoising step (all of its images move together)."""

    step: int
    """Steps done (1-based)."""
    total_steps: int
    """Steps the request runs."""


@dataclasses.dataclass(frozen=True)
class PartialImages:
    """A streamed request's preview: every image's x0-prediction after `step`, projected to RGB at a quarter of the
    side (`preview: "fast"`, `VaeStage.preview`) or decoded by the VAE (`"full"`)."""

    index: int
    """0-based number of this preview within the request (OpenAI's `partial_image_index`)."""
    step: int
    """The step it was taken after."""
    pngs: list[bytes]
    """Encoded image bytes (as `GenerationResult.images`), one per seed, in seed order."""


StreamItem = StepUpdate | PartialImages | GenerationResult
"""What a backend's stream yields: step updates and previews in order, then exactly one `GenerationResult`, whose
images are those the non-streaming call gives for the same spec."""


class GenerationBackend(Protocol):
    preset: ModelPreset

    async def generate(self, spec: GenerationSpec) -> GenerationResult: ...

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        """img2img (no mask) or inpainting; `image` RGB and `mask` "L" (255 = edit) as uploaded, of the same size.
        The backend prepares them and composes the outputs with `lightray.edits`."""
        ...

    def generate_stream(self, spec: GenerationSpec) -> AsyncIterator[StreamItem]:
        """`generate` as a stream (`spec.partial_images` previews). Closing it early cancels the work."""
        ...

    def edit_stream(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None
                    ) -> AsyncIterator[StreamItem]:
        """`edit` as a stream; previews are composed as the final image is."""
        ...

    async def instruct(self, spec: GenerationSpec, images: list[Image.Image]) -> GenerationResult:
        """An instruction edit (a model whose family takes condition images): `spec.prompt` about `images` (1-3,
        RGB, as uploaded)."""
        ...

    def instruct_stream(self, spec: GenerationSpec, images: list[Image.Image]) -> AsyncIterator[StreamItem]:
        """`instruct` as a stream."""
        ...

    async def readiness(self) -> dict[str, bool]: ...


READINESS_TTL_S = 2.0
"""How long one fan-out of health checks to the stages answers `/readyz`: a load balancer polling from many places,
or a flood of probes, costs the stages one check per stage per this many seconds."""


class SharedCheck:
    """An async check run at most once per `ttl_s`, its answer shared: callers within the TTL get the last answer,
    and callers while it runs wait for that one run (never a second, concurrent one). So any number of concurrent
    probes gives one answer, and the stages see no more checks than the TTL allows."""

    def __init__(self, check: Callable[[], Awaitable[dict[str, bool]]], ttl_s: float):
        self._check, self.ttl_s = check, ttl_s
        self._answer: dict[str, bool] | None = None
        self._answered_at = 0.0
        self._running: asyncio.Future | None = None

    async def get(self) -> dict[str, bool]:
        if self._answer is not None and time.monotonic() - self._answered_at < self.ttl_s:
            return self._answer
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._running)

    async def _refresh(self) -> dict[str, bool]:
        try:
            answer = await self._check()
            self._answer, self._answered_at = answer, time.monotonic()
            return answer
        finally:
            self._running = None


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
        return await _client_errors(spec, asyncio.to_thread(self._run, spec, draw, spec.output))

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        draw = lambda adapter_paths: self.pipeline.edit(spec, image, mask, adapter_paths)  # noqa: E731
        return await _client_errors(spec, asyncio.to_thread(self._run, spec, draw, spec.output))

    def generate_stream(self, spec: GenerationSpec) -> AsyncIterator[StreamItem]:
        return self._stream(spec, lambda paths, on_progress, cancel: self.pipeline.generate(
            spec, paths, on_progress=on_progress, cancel=cancel), spec.output)

    async def instruct(self, spec: GenerationSpec, images: list[Image.Image]) -> GenerationResult:
        draw = lambda adapter_paths: self.pipeline.instruct(spec, images, adapter_paths)  # noqa: E731
        return await _client_errors(spec, asyncio.to_thread(self._run, spec, draw, spec.output))

    def instruct_stream(self, spec: GenerationSpec, images: list[Image.Image]) -> AsyncIterator[StreamItem]:
        return self._stream(spec, lambda paths, on_progress, cancel: self.pipeline.instruct(
            spec, images, paths, on_progress=on_progress, cancel=cancel), spec.output)

    def edit_stream(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None
                    ) -> AsyncIterator[StreamItem]:
        return _composed_stream(spec, image, mask, lambda prepared: self._stream(
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

        work = asyncio.ensure_future(_client_errors(spec, asyncio.to_thread(
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
        self._readiness = SharedCheck(self._check_stages, READINESS_TTL_S)

    async def generate(self, spec: GenerationSpec) -> GenerationResult:
        return await _client_errors(spec, self._generate(spec))

    def _denoiser_for(self, spec: GenerationSpec):
        if spec.adapters:
            # Routes to a replica that already holds the first adapter when there is one; the replica fetches
            # any other adapter it lacks itself.
            return self.denoiser.options(multiplexed_model_id=spec.adapters[0].ref)
        return self.denoiser

    def _encode(self, spec: GenerationSpec):
        # `handoff_at`: wall-clock send time, from which the stage measures its queue wait (deployments/metrics.py).
        return self.text_encoder.encode.remote(spec.prompt, spec.negative_prompt, handoff_at=time.time())

    async def _generate(self, spec: GenerationSpec) -> GenerationResult:
        start = time.perf_counter()
        encoded = self._encode(spec)
        denoised = self._denoiser_for(spec).denoise.remote(spec.denoise_params(), encoded)
        result = await _cancelling(self.vae.decode.remote(denoised, spec.width, spec.height, encoding=spec.output),
                                   encoded, denoised)
        return GenerationResult(list(result.pngs), {**result.timings, "graph_ms": (time.perf_counter() - start) * 1000})

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        return await _client_errors(spec, self._edit(spec, image, mask))

    def _encode_image(self, spec: EditSpec, prepared: PreparedEdit):
        """The VAE replica's encode of the prepared image, for each seed (`VaeDecoder.encode`)."""
        return self.vae.encode.remote(np.asarray(prepared.image), spec.seeds, spec.width, spec.height,
                                      handoff_at=time.time())

    async def _edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None) -> GenerationResult:
        """The text encoder and the VAE's encoder run concurrently; both responses go handle to handle into the
        denoiser, whose output goes to the VAE's decoder, as in `generate`; the ingress composes the PNGs."""
        start = time.perf_counter()
        prepared = await asyncio.to_thread(prepare_edit, image, mask, spec)
        encoded = self._encode(spec)
        image_latents = self._encode_image(spec, prepared)
        denoised = self._denoiser_for(spec).denoise.remote(
            spec.denoise_params(), encoded, image_latents, _mask_pixels(prepared))
        result = await _cancelling(self.vae.decode.remote(denoised, spec.width, spec.height,
                                                          encoding=decoded_encoding(prepared, spec.output)),
                                   encoded, image_latents, denoised)
        return await _composed_result(
            GenerationResult(list(result.pngs), {**result.timings, "graph_ms": (time.perf_counter() - start) * 1000}),
            prepared, spec.output)

    def _instruct_inputs(self, spec: GenerationSpec, images: list[Image.Image]):
        """The instruction's embeddings (the TextEncoder reads the images with it) and the images' condition
        latents (the VaeDecoder's encoder), requested concurrently: two responses for the Denoiser."""
        pixels = [np.asarray(im) for im in images]
        encoded = self.text_encoder.encode_instruction.remote(spec.prompt, spec.negative_prompt, pixels, spec.width,
                                                               spec.height, handoff_at=time.time())
        condition = self.vae.encode_conditions.remote(pixels, spec.width, spec.height, handoff_at=time.time())
        return encoded, condition

    async def instruct(self, spec: GenerationSpec, images: list[Image.Image]) -> GenerationResult:
        return await _client_errors(spec, self._instruct(spec, images))

    async def _instruct(self, spec: GenerationSpec, images: list[Image.Image]) -> GenerationResult:
        start = time.perf_counter()
        encoded, condition = self._instruct_inputs(spec, images)
        denoised = self._denoiser_for(spec).denoise.remote(spec.denoise_params(), encoded, None, None, condition)
        result = await _cancelling(self.vae.decode.remote(denoised, spec.width, spec.height, encoding=spec.output),
                                   encoded, condition, denoised)
        return GenerationResult(list(result.pngs), {**result.timings, "graph_ms": (time.perf_counter() - start) * 1000})

    def instruct_stream(self, spec: GenerationSpec, images: list[Image.Image]) -> AsyncIterator[StreamItem]:
        encoded, condition = self._instruct_inputs(spec, images)
        denoising = self._denoise_stream(spec, spec.output, encoded, None, None, condition)
        return _stream_client_errors(spec, self._stream(spec, denoising, encoded, condition, encoding=spec.output))

    def _denoise_stream(self, spec: GenerationSpec, encoding: OutputEncoding, *inputs):
        """The Denoiser's stream for `spec`; fast previews come made by the Denoiser when its model ships a preview
        decoder (`preview_encoding`), else as latents for the VaeDecoder."""
        return self._denoiser_for(spec).options(stream=True).denoise_stream.remote(
            spec.denoise_params(), *inputs, preview_encoding=encoding if spec.preview == "fast" else None)

    def generate_stream(self, spec: GenerationSpec) -> AsyncIterator[StreamItem]:
        encoded = self._encode(spec)
        denoising = self._denoise_stream(spec, spec.output, encoded)
        return _stream_client_errors(spec, self._stream(spec, denoising, encoded, encoding=spec.output))

    def edit_stream(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None
                    ) -> AsyncIterator[StreamItem]:
        def start(prepared: PreparedEdit) -> AsyncIterator[StreamItem]:
            encoded = self._encode(spec)
            image_latents = self._encode_image(spec, prepared)
            encoding = decoded_encoding(prepared, spec.output)
            denoising = self._denoise_stream(spec, encoding, encoded, image_latents, _mask_pixels(prepared))
            return self._stream(spec, denoising, encoded, image_latents, encoding=encoding)

        return _stream_client_errors(spec, _composed_stream(spec, image, mask, start))

    async def _stream(self, spec: GenerationSpec, denoising, *upstream,
                      encoding: OutputEncoding) -> AsyncIterator[StreamItem]:
        """The Denoiser's stream as `StreamItem`s. Each preview the Denoiser did not make itself goes to the
        VaeDecoder as soon as it arrives (`preview`, or batched with other decodes for "full") while the steps go
        on; previews are yielded in order, each as soon as it and those before it are decoded, and all before the
        final image. The final latents pass through the
        ingress to the VaeDecoder (a generator's items cannot be handed on handle to handle). If the stream is
        closed early, or fails, every stage's request is cancelled (the Denoiser stops within a step). Previews and
        images are encoded as `encoding`."""
        start = time.perf_counter()
        previews: list[asyncio.Future] = []
        responses = [denoising, *upstream]  # cancelled if the stream ends early (preview decodes: by their tasks)
        sent = 0
        finished = False
        try:
            denoised: DenoisedLatents | None = None
            async for item in denoising:
                if isinstance(item, DenoisedLatents):
                    denoised = item
                    continue
                yield StepUpdate(item.step, item.total_steps)
                if item.preview_images is not None:  # made by the Denoiser (fast, a shipped preview decoder)
                    made = asyncio.get_running_loop().create_future()
                    made.set_result(PartialImages(len(previews), item.step, list(item.preview_images)))
                    previews.append(made)
                elif item.preview is not None:
                    if spec.preview == "full":
                        response = self.vae.decode.remote(DenoisedLatents(item.preview), spec.width, spec.height,
                                                          encoding=encoding)
                    else:  # "fast": the VAE replica's projection, no VAE call (VaeDecoder.preview)
                        response = self.vae.preview.remote(item.preview, spec.width, spec.height,
                                                           encoding=encoding)
                    previews.append(asyncio.ensure_future(_partial(len(previews), item.step, response)))
                while sent < len(previews) and previews[sent].done():
                    yield previews[sent].result()
                    sent += 1
            if denoised is None:
                raise RuntimeError("the Denoiser's stream ended without its latents")
            decoded = self.vae.decode.remote(denoised, spec.width, spec.height, encoding=encoding)
            responses.append(decoded)
            for preview in previews[sent:]:
                yield await preview
            result = await decoded
            finished = True
            yield GenerationResult(list(result.pngs),
                                   {**result.timings, "graph_ms": (time.perf_counter() - start) * 1000})
        finally:
            if not finished:
                for response in responses:
                    response.cancel()
                for preview in previews:
                    preview.cancel()

    async def readiness(self) -> dict[str, bool]:
        """Each stage answered its own health check within 5 s (a replica still loading does not), as checked at
        most once per `READINESS_TTL_S` however many probes ask (`SharedCheck`)."""
        return await self._readiness.get()

    async def _check_stages(self) -> dict[str, bool]:
        stages = {"TextEncoder": self.text_encoder, "Denoiser": self.denoiser, "VaeDecoder": self.vae}

        async def healthy(handle) -> bool:
            try:
                await asyncio.wait_for(handle.check_health.remote(), timeout=5)
                return True
            except Exception:
                return False

        results = await asyncio.gather(*(healthy(h) for h in stages.values()))
        return dict(zip(stages, results))


# Serve names each replica's actor class `ServeReplica:<app>:<deployment>`; not a public contract, so
# tests/test_faults.py pins it by killing a Denoiser replica and reading the stage back from the 503.
_SERVE_REPLICA_CLASS_PREFIX = "ServeReplica:"


def _dead_replica_deployment(lost: BaseException) -> str | None:
    """The deployment whose replica died, from public API rather than Ray's message text: a `RayActorError`
    carries the actor's id (`actor_id`), and the state API (`ray.util.state.get_actor`) its class name. None when
    the error names no actor (a crashed worker, a lost object, a deployment that failed to deploy) or the lookup
    fails. Blocking (a request to the dashboard): call it off the event loop."""
    actor_id = getattr(lost, "actor_id", None)
    if not actor_id:
        return None
    try:
        from ray.util.state import get_actor

        actor = get_actor(actor_id, timeout=15)  # the dashboard answers slowly on a loaded head node
    except Exception:  # noqa: BLE001 - the message falls back to "a stage"; the 503 stands either way
        return None
    class_name = getattr(actor, "class_name", None) or ""
    if not class_name.startswith(_SERVE_REPLICA_CLASS_PREFIX):
        return None
    return class_name.rsplit(":", 1)[-1]


def _find_cause(err: BaseException, types: tuple) -> BaseException | None:
    """The first of `types` along `err`'s chain of causes: a replica's exception reaches the ingress wrapped
    (`RayTaskError.cause`), and a replica that died under a chained call surfaces as the next stage's
    `RayServeException` whose `__cause__` is the `ActorDiedError`."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None)
        if isinstance(err, types) and not isinstance(inner, types):  # prefer a wrapped cause's own message
            return err
        err = inner if isinstance(inner, BaseException) else err.__cause__
    return None


def _mask_pixels(prepared: PreparedEdit) -> np.ndarray | None:
    """The prepared mask as the Denoiser takes it ("L" pixels, non-zero = repaint), None for img2img."""
    return None if prepared.mask is None else np.asarray(prepared.mask)


async def _composed_result(result: GenerationResult, prepared: PreparedEdit,
                           encoding: OutputEncoding) -> GenerationResult:
    """`result` with its images composed and encoded as `encoding` (`lightray.edits.compose_pngs`, in a worker
    thread); `compose_ms` timed."""
    if not prepared.composes:
        return result
    start = time.perf_counter()
    pngs = await asyncio.to_thread(compose_pngs, result.images, prepared, encoding)
    return GenerationResult(pngs, {**result.timings, "compose_ms": (time.perf_counter() - start) * 1000})


async def _composed_stream(spec: EditSpec, image: Image.Image, mask: Image.Image | None,
                           start: Callable[[PreparedEdit], AsyncIterator[StreamItem]]) -> AsyncIterator[StreamItem]:
    """An edit's stream, the same for both backends: prepare the edit (in a worker thread), `start(prepared)` the
    model's stream, and yield its items with every preview and the final image composed as the non-streaming
    `edit` composes its images, and encoded as `spec.output` (`start` has the model's outputs encoded as
    `lightray.edits.decoded_encoding` says). Closing this closes the model's stream at once (which cancels its
    work). Previews are composed onto `lightray.edits.preview_frame` (with `padding_mask_crop`, the input scaled
    down to the model's pixels), made when the first one comes."""
    prepared = await asyncio.to_thread(prepare_edit, image, mask, spec)
    preview = None
    items = start(prepared)
    try:
        async for item in items:
            if isinstance(item, PartialImages):
                if preview is None:
                    preview = await asyncio.to_thread(preview_frame, prepared)
                pngs = await asyncio.to_thread(compose_preview_pngs, item.pngs, preview, spec.output)
                item = dataclasses.replace(item, pngs=pngs)
            elif isinstance(item, GenerationResult):
                item = await _composed_result(item, prepared, spec.output)
            yield item
    finally:
        await items.aclose()


async def _partial(index: int, step: int, response) -> PartialImages:
    return PartialImages(index, step, list((await response).pngs))


async def _client_errors(spec: GenerationSpec | EditSpec, work) -> GenerationResult:
    """`await work`, its failure as a client should see it (`_as_client_error`)."""
    try:
        return await work
    except Exception as err:
        converted = await _as_client_error(spec, err)
        if converted is err:
            raise
        raise converted from None


async def _stream_client_errors(spec: GenerationSpec | EditSpec, items: AsyncIterator[StreamItem]
                                ) -> AsyncIterator[StreamItem]:
    """`items`, a failure on the way as a client should see it (`_as_client_error`). Closing this stream closes
    `items` at once (which cancels their work), not whenever it is garbage-collected."""
    try:
        async for item in items:
            yield item
    except Exception as err:
        converted = await _as_client_error(spec, err)
        if converted is err:
            raise
        raise converted from None
    finally:
        await items.aclose()


async def _as_client_error(spec: GenerationSpec | EditSpec, err: Exception) -> Exception:
    """A graph failure as a client should see it: a stage's `RequestError` → that error (a 4xx naming the field);
    overload or a dead/restarting replica → 503 + Retry-After
    naming the stage (Serve replaces the replica by itself); an adapter the Denoiser could not fetch (corrupt or
    missing in the registry) → an error naming that adapter. Anything else is `err` itself (a 500)."""
    from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    refs = ", ".join(repr(a.ref) for a in spec.adapters)
    refused = _find_cause(err, (RequestError,))
    if refused is not None:  # a stage found the request bad (a 2.1 prompt past its encoder's limit)
        return refused
    if isinstance(err, BackPressureError):
        return ServiceUnavailable("the service is at capacity; retry shortly", retry_after_s=2)
    if _find_cause(err, (EngineFull,)) is not None:
        return ServiceUnavailable("the denoiser is at capacity; retry shortly", retry_after_s=2)
    adapter_err = _find_cause(err, (AdapterRegistryError, AdapterLoadError))
    if adapter_err is not None:
        if isinstance(adapter_err, AdapterNotFound):
            return NotFound("lora", f"adapter {refs} is no longer in the registry: {adapter_err}",
                            code="adapter_not_found")
        code = ("adapter_corrupt" if isinstance(adapter_err, (AdapterCorrupt, AdapterLoadError))
                else "adapter_unavailable")
        return AdapterUnavailable("lora", f"adapter {refs} could not be loaded: {adapter_err}", code=code)
    lost = _find_cause(err, (RayActorError, WorkerCrashedError, ObjectLostError, DeploymentUnavailableError))
    if lost is None:
        return err
    stage = await asyncio.to_thread(_dead_replica_deployment, lost)
    where = f"the {stage} stage" if stage else "a stage"
    return ServiceUnavailable(f"{where} is unavailable ({type(lost).__name__}: a replica died or is restarting);"
                              " retry shortly", retry_after_s=5)

"""The generation graph on Ray Serve (`RayGraphBackend`): chains the stage deployments' handle calls for a
request, streams, cancels every stage's call when the caller gives up, and checks the stages' health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from lightray.config import ModelPreset
from lightray.contracts import DenoisedLatents, OutputEncoding
from lightray.edits import PreparedEdit, decoded_encoding, prepare_edit
from lightray.schemas import EditSpec, GenerationSpec
from serve_app.backend import GenerationResult, PartialImages, StepUpdate, StreamItem
from serve_app.edit_composition import composed_result, composed_stream
from serve_app.graph_failures import StageFailed, client_errors, stream_client_errors
from serve_app.readiness import READINESS_TTL_S, SharedCheck


class StageCall(NamedTuple):
    """A stage's response and the deployment it came from, so that a failure can name its stage."""

    stage: str
    response: Any  # DeploymentResponse or DeploymentResponseGenerator


def _call(handle, response) -> StageCall:
    return StageCall(handle.deployment_name, response)


def _failure_of(call: StageCall, err: Exception) -> Exception:
    """What `call`'s failure `err` is raised as. Over Ray Serve's gRPC data plane (responses passed by value) a
    chained call starts only once its arguments are resolved, so its failure is its own stage's: `StageFailed`
    naming the stage, `err` its cause. By reference, a chained call also fails when an upstream replica died, so
    `err` as it is."""
    if call.response.by_reference:
        return err
    failure = StageFailed(call.stage)
    failure.__cause__ = err
    return failure


async def _outcome(call: StageCall):
    """`call`'s result, its failure as `_failure_of` has it."""
    try:
        return await call.response
    except Exception as err:
        raise _failure_of(call, err)


def _watch(upstream: tuple[StageCall, ...]) -> set[asyncio.Future]:
    """A task awaiting each by-value upstream response (`_cancelling` says why); by-reference ones are not awaited
    (their arrays would be pulled into the ingress)."""
    return {asyncio.ensure_future(_outcome(c)) for c in upstream if not c.response.by_reference}


async def _cancelling(final: StageCall, *upstream: StageCall):
    """Await the graph's last response; if the caller gives up on it (the request timeout, a disconnect), or a
    stage fails, cancel every stage's request too, so replicas stop work nobody will read (the Denoiser stops within
    a step).

    An upstream stage's failure ends the wait as well. Over Ray Serve's gRPC data plane
    (`RAY_SERVE_USE_GRPC_BY_DEFAULT`, responses passed by value) a chained call whose upstream replica died is never
    answered: the next handle's router resolves the argument, gets `ActorUnavailableError`, and retries the
    resolution until the caller gives up (ray 2.60's `Router` retries that error even before it chose a replica).
    So the by-value upstream responses are awaited here too: their values are fetched into this process by that
    router anyway. By-reference ones need no watch (the chained call fails with the upstream's `ActorDiedError`),
    and awaiting them would pull their arrays into the ingress."""
    last = asyncio.ensure_future(_outcome(final))
    watched = _watch(upstream)
    try:
        pending = {last, *watched}
        while last in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {last}:
                task.result()  # an upstream stage's failure
        return last.result()
    except BaseException:
        for call in (final, *upstream):
            call.response.cancel()
        raise
    finally:
        for task in (last, *watched):
            task.cancel()


async def _watched_stream(stream: StageCall, upstream: tuple[StageCall, ...]) -> AsyncIterator:
    """`stream`'s items, ended by the failure of a by-value upstream response (`_cancelling` says why: the stream
    would otherwise never start); a failure of the stream itself names its stage as `_outcome` does."""
    watched = _watch(upstream)
    items = stream.response.__aiter__()
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(items))
            while not step.done():
                done, _ = await asyncio.wait({step, *watched}, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {step}:
                    watched.discard(task)
                    task.result()  # an upstream stage's failure
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            except Exception as err:
                raise _failure_of(stream, err)
            yield item
    finally:
        for task in (step, *watched):
            if task is not None:
                task.cancel()


class RayGraphBackend:
    """Chains the stage deployments' responses handle to handle: each stage's output goes straight to the next
    replica as an argument, so the ingress never holds embeddings or latents."""

    def __init__(self, preset: ModelPreset, text_encoder, denoiser, vae):
        self.preset = preset
        self.text_encoder, self.denoiser, self.vae = text_encoder, denoiser, vae
        self._readiness = SharedCheck(self._check_stages, READINESS_TTL_S)

    async def generate(self, spec: GenerationSpec) -> GenerationResult:
        return await client_errors(spec, self._generate(spec))

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
        result = await _cancelling(
            _call(self.vae, self.vae.decode.remote(denoised, spec.width, spec.height, encoding=spec.output)),
            _call(self.text_encoder, encoded), _call(self.denoiser, denoised))
        return GenerationResult(list(result.pngs), {**result.timings, "graph_ms": (time.perf_counter() - start) * 1000})

    async def edit(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None) -> GenerationResult:
        return await client_errors(spec, self._edit(spec, image, mask))

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
        result = await _cancelling(
            _call(self.vae, self.vae.decode.remote(denoised, spec.width, spec.height,
                                                   encoding=decoded_encoding(prepared, spec.output))),
            _call(self.text_encoder, encoded), _call(self.vae, image_latents), _call(self.denoiser, denoised))
        return await composed_result(
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
        return await client_errors(spec, self._instruct(spec, images))

    async def _instruct(self, spec: GenerationSpec, images: list[Image.Image]) -> GenerationResult:
        start = time.perf_counter()
        encoded, condition = self._instruct_inputs(spec, images)
        denoised = self._denoiser_for(spec).denoise.remote(spec.denoise_params(), encoded, None, None, condition)
        result = await _cancelling(
            _call(self.vae, self.vae.decode.remote(denoised, spec.width, spec.height, encoding=spec.output)),
            _call(self.text_encoder, encoded), _call(self.vae, condition), _call(self.denoiser, denoised))
        return GenerationResult(list(result.pngs), {**result.timings, "graph_ms": (time.perf_counter() - start) * 1000})

    def instruct_stream(self, spec: GenerationSpec, images: list[Image.Image]) -> AsyncIterator[StreamItem]:
        encoded, condition = self._instruct_inputs(spec, images)
        denoising = self._denoise_stream(spec, spec.output, encoded, None, None, condition)
        return stream_client_errors(spec, self._stream(spec, denoising, _call(self.text_encoder, encoded),
                                                       _call(self.vae, condition), encoding=spec.output))

    def _denoise_stream(self, spec: GenerationSpec, encoding: OutputEncoding, *inputs):
        """The Denoiser's stream for `spec`; fast previews come made by the Denoiser when its model ships a preview
        decoder (`preview_encoding`), else as latents for the VaeDecoder."""
        handle = self._denoiser_for(spec).options(stream=True)
        return _call(handle, handle.denoise_stream.remote(
            spec.denoise_params(), *inputs, preview_encoding=encoding if spec.preview == "fast" else None))

    def generate_stream(self, spec: GenerationSpec) -> AsyncIterator[StreamItem]:
        encoded = self._encode(spec)
        denoising = self._denoise_stream(spec, spec.output, encoded)
        return stream_client_errors(spec, self._stream(spec, denoising, _call(self.text_encoder, encoded),
                                                       encoding=spec.output))

    def edit_stream(self, spec: EditSpec, image: Image.Image, mask: Image.Image | None = None
                    ) -> AsyncIterator[StreamItem]:
        def start(prepared: PreparedEdit) -> AsyncIterator[StreamItem]:
            encoded = self._encode(spec)
            image_latents = self._encode_image(spec, prepared)
            encoding = decoded_encoding(prepared, spec.output)
            denoising = self._denoise_stream(spec, encoding, encoded, image_latents, _mask_pixels(prepared))
            return self._stream(spec, denoising, _call(self.text_encoder, encoded), _call(self.vae, image_latents),
                                encoding=encoding)

        return stream_client_errors(spec, composed_stream(spec, image, mask, start))

    async def _stream(self, spec: GenerationSpec, denoising: StageCall, *upstream: StageCall,
                      encoding: OutputEncoding) -> AsyncIterator[StreamItem]:
        """The Denoiser's stream as `StreamItem`s. Each preview the Denoiser did not make itself goes to the
        VaeDecoder as soon as it arrives (`preview`, or batched with other decodes for "full") while the steps go
        on; previews are yielded in order, each as soon as it and those before it are decoded, and all before the
        final image. The final latents pass through the
        ingress to the VaeDecoder (a generator's items cannot be handed on handle to handle). If the stream is
        closed early, or fails, every stage's request is cancelled (the Denoiser stops within a step); a by-value
        upstream that fails ends it (`_watched_stream`). Previews and images are encoded as `encoding`."""
        start = time.perf_counter()
        previews: list[asyncio.Future] = []
        calls = [denoising, *upstream]  # cancelled if the stream ends early (preview decodes: by their tasks)
        sent = 0
        finished = False
        try:
            denoised: DenoisedLatents | None = None
            async with aclosing(_watched_stream(denoising, upstream)) as items:
                async for item in items:
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
                        previews.append(asyncio.ensure_future(
                            _partial(len(previews), item.step, _call(self.vae, response))))
                    while sent < len(previews) and previews[sent].done():
                        yield previews[sent].result()
                        sent += 1
            if denoised is None:
                raise RuntimeError("the Denoiser's stream ended without its latents")
            decoded = _call(self.vae, self.vae.decode.remote(denoised, spec.width, spec.height, encoding=encoding))
            calls.append(decoded)
            for preview in previews[sent:]:
                yield await preview
            result = await _outcome(decoded)
            finished = True
            yield GenerationResult(list(result.pngs),
                                   {**result.timings, "graph_ms": (time.perf_counter() - start) * 1000})
        finally:
            if not finished:
                for call in calls:
                    call.response.cancel()
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


def _mask_pixels(prepared: PreparedEdit) -> np.ndarray | None:
    """The prepared mask as the Denoiser takes it ("L" pixels, non-zero = repaint), None for img2img."""
    return None if prepared.mask is None else np.asarray(prepared.mask)


async def _partial(index: int, step: int, call: StageCall) -> PartialImages:
    return PartialImages(index, step, list((await _outcome(call)).pngs))

"""The VaeDecoder deployment: `DenoisedLatents` → `DecodedImages` (PNG, JPEG or WebP), with concurrent decodes batched
(`serve.batch`), and the VAE encoder for image inputs (`ImageLatents`).

The decodes gathered into one batch run in the VAE calls of `VaeStage.decode_plan`: with `stack_requests` "exact"
(the default), requests share a call only where that is bit-exact (the 3D VAE: requests of one size with n >= 2
images; the single-frame VAE: none), with "all" every request of one size shares one call, within the float
tolerance measured in `lightray/stages/vae.py` and docs/batching.md. The batch handler runs one batch at a time, which also serialises the decodes on the VAE's
per-call state (the stage's lock still guards it against `encode`, which Serve runs in its thread pool). The default
`batch_wait_timeout_s` is 0: a batch is whatever queued while the previous one ran.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
from PIL import Image
from ray import serve

from deployments.metrics import log_request, record_batch, record_queue_wait, record_stages
from deployments.timing import timed
from lightray.config import load_preset
from lightray.contracts import PNG, ConditionLatents, DecodedImages, DenoisedLatents, ImageLatents, OutputEncoding
from lightray.engine.load import QueueWork
from lightray.images import encode_image
from lightray.stages import VaeStage
from lightray.stages.vae import StackPolicy

MAX_BATCH_SIZE = 8
"""Decode requests per batch (at most the deployment's `max_ongoing_requests`)."""
BATCH_WAIT_TIMEOUT_S = 0.0
MAX_IMAGES_PER_CALL = 32
"""Most images stacked into one VAE call (a request is never split, so one larger request still gets its call):
bounds the activation memory of large images on an accelerator."""


@dataclasses.dataclass(frozen=True)
class DecodeItem:
    """One request's input to the batch handler."""

    latents: np.ndarray
    """[n, tokens, 64] packed latents."""
    height: int
    width: int


@dataclasses.dataclass(frozen=True)
class DecodedItem:
    """The batch handler's output for one request."""

    images: list[Image.Image]
    decode_ms: float
    """Milliseconds of the VAE call that decoded this request (shared with the requests stacked with it)."""
    started_at: float
    """Wall-clock start of that call (the end of the request's queue wait)."""
    call_images: int
    """Images in that call."""
    batch_requests: int
    """Requests in the batch this one was decoded with."""


def decode_batch(stage: VaeStage, items: list[DecodeItem], max_images: int | None = MAX_IMAGES_PER_CALL,
                 stack: StackPolicy = "exact") -> list[DecodedItem | Exception]:
    """Every request's images, in the order of `items`, each `stage.decode` of its own latents (bit for bit with
    `stack` "exact"), in the VAE calls of `VaeStage.decode_plan`. If the batch fails, each request is retried alone, so one bad
    request (latents that do not match its size) fails only itself: its entry is then the exception."""
    try:
        return _decode_all(stage, items, max_images, stack)
    except Exception:
        if len(items) == 1:
            raise
    return [_alone(_decode_all, stage, item, max_images, stack) for item in items]


def _alone(batch_fn, stage, item, *args):
    try:
        return batch_fn(stage, [item], *args)[0]
    except Exception as err:  # noqa: BLE001 - handed to that request's caller
        return err


def _decode_all(stage: VaeStage, items: list[DecodeItem], max_images: int | None,
                stack: StackPolicy) -> list[DecodedItem]:
    requests = [(item.latents, item.height, item.width) for item in items]
    out: dict[int, DecodedItem] = {}
    calls = stage.decode_calls(requests, max_images, stack)
    while True:
        started, t0 = time.time(), time.perf_counter()
        call = next(calls, None)  # runs the call's VAE decode
        if call is None:
            break
        ms = (time.perf_counter() - t0) * 1000.0
        n = sum(len(images) for _, images in call)
        record_batch("decode", n)
        for i, images in call:
            out[i] = DecodedItem(images, ms, started, n, len(items))
    return [out[i] for i in range(len(items))]


@serve.deployment(name="VaeDecoder")
class VaeDecoder:
    """The VAE stage, both ways: `decode` turns denoised latents into PNGs (batched across requests), and `encode`
    turns an input image into starting latents for img2img and inpainting. One deployment holds the VAE once for
    both; it keeps the name `VaeDecoder` because Serve configs (configs/serve/*.yaml, k8s/rayservice.yaml) and
    dashboards refer to the deployment by that name."""

    def __init__(self, preset: dict, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S,
                 max_images_per_call: int | None = MAX_IMAGES_PER_CALL, stack_requests: StackPolicy = "exact"):
        self.stage = VaeStage(load_preset(preset))
        self.max_images_per_call = max_images_per_call
        self.stack_requests = stack_requests
        self._decode_batch.set_max_batch_size(max_batch_size)
        self._decode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.load = QueueWork(prior_s_per_unit=2e-5)
        """Pixels queued and decoding here x seconds per pixel (deployments/autoscaling.py scales on it)."""

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's replica-reported metric: seconds of work in this replica's batch queue and decode."""
        return {"work_s": self.load.work_seconds()}

    async def decode(self, denoised: DenoisedLatents, width: int, height: int,
                     encoding: OutputEncoding = PNG) -> DecodedImages:
        """Denoiser output → images encoded as `encoding` (the request's `output_format`) in seed order, with
        `denoised.timings` + decode_ms, png_ms (the encode, whatever the format) and decode_wait_ms (from the
        denoiser's `handoff_at` to the start of the VAE call that decoded this request). Encoding happens here:
        compressed bytes are a smaller hop than raw pixels, and it spreads CPU work away from the ingress."""
        pixels = len(denoised.latents) * width * height
        self.load.add(pixels)
        try:
            out = await self._decode_batch(DecodeItem(denoised.latents, height, width))
        except BaseException:
            self.load.done(pixels)
            raise
        self.load.done(pixels, None if isinstance(out, Exception) else
                       out.decode_ms / 1000 * len(denoised.latents) / max(out.call_images, 1))
        if isinstance(out, Exception):
            raise out
        timings = dict(denoised.timings)
        record_queue_wait("decode", timings, denoised.handoff_at, started=out.started_at)
        timings["decode_ms"] = out.decode_ms
        with timed(timings, "png_ms"):  # in a thread, overlapping the next batch's decode
            pngs = await asyncio.to_thread(lambda: tuple(encode_image(im, encoding) for im in out.images))
        record_stages(timings, "decode_ms", "png_ms")
        log_request("decode", images=len(pngs), size=f"{width}x{height}", format=encoding.format,
                    batch=out.batch_requests,
                    call_images=out.call_images, wait_ms=timings.get("decode_wait_ms"),
                    decode_ms=timings["decode_ms"], png_ms=timings["png_ms"])
        return DecodedImages(pngs, timings)

    def preview(self, latents: np.ndarray, width: int, height: int, encoding: OutputEncoding = PNG) -> DecodedImages:
        """A streamed request's x0-prediction latents [n, tokens, 64] → cheap previews (a quarter of the side)
        encoded as `encoding`, in seed order, with preview_ms and png_ms (`VaeStage.preview`: a latent-to-RGB
        projection, no VAE call, so neither batched nor behind the decodes). Here rather than at the ingress, which
        never computes pixels."""
        timings: dict[str, float] = {}
        with timed(timings, "preview_ms"):
            images = self.stage.preview(latents, height, width)
        with timed(timings, "png_ms"):
            pngs = tuple(encode_image(im, encoding) for im in images)
        record_stages(timings, "preview_ms")
        log_request("preview", images=len(pngs), size=f"{width}x{height}", preview_ms=timings["preview_ms"],
                    png_ms=timings["png_ms"])
        return DecodedImages(pngs, timings)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def _decode_batch(self, items: list[DecodeItem]) -> list[DecodedItem | Exception]:
        # In a worker thread: the replica's event loop keeps taking requests (and filling the next batch).
        return await asyncio.to_thread(decode_batch, self.stage, items, self.max_images_per_call,
                                       self.stack_requests)

    def encode(self, image: np.ndarray, seeds: list[int], width: int, height: int,
               handoff_at: float | None = None) -> ImageLatents:
        """An input image (uint8 [h, w, 3]) → `ImageLatents` for `seeds`: the denoiser's starting point for
        img2img / inpainting (`VaeStage.encode_for_seeds`). Here rather than in the Denoiser: on the embedded model
        a 64x64 encode takes 3–5 times a handle hop, time the (scarcer) denoiser would otherwise spend, and it runs
        concurrently with the text encoder. Here rather than in a deployment of its own: that would cost the same
        hop plus a second copy of the VAE (docs/image_inputs.md). Not batched: an encode is per image and seeds,
        and rarer than decodes. `handoff_at`: when the ingress sent the request (wall-clock s), for the queue-wait
        metric."""
        timings: dict[str, float] = {}
        record_queue_wait("vae_encode", timings, handoff_at)
        with timed(timings, "vae_encode_ms"):
            start = self.stage.encode_for_seeds(Image.fromarray(image), seeds, height, width)
        record_stages(timings, "vae_encode_ms")
        log_request("vae_encode", images=len(seeds), size=f"{width}x{height}",
                    wait_ms=timings.get("vae_encode_wait_ms"), vae_encode_ms=timings["vae_encode_ms"])
        return dataclasses.replace(start, timings=timings, handoff_at=time.time())

    def encode_conditions(self, images: list[np.ndarray], width: int, height: int,
                          handoff_at: float | None = None) -> ConditionLatents:
        """An instruction edit's input images (uint8 [h, w, 3] each) → condition latents for an output of
        width × height (`VaeStage.encode_conditions`), concurrently with the TextEncoder, as `encode` is."""
        timings: dict[str, float] = {}
        record_queue_wait("vae_encode", timings, handoff_at)
        with timed(timings, "vae_encode_ms"):
            condition = self.stage.encode_conditions([Image.fromarray(im) for im in images], width, height)
        record_stages(timings, "vae_encode_ms")
        log_request("vae_encode", images=len(images), size=f"{width}x{height}",
                    wait_ms=timings.get("vae_encode_wait_ms"), vae_encode_ms=timings["vae_encode_ms"])
        return dataclasses.replace(condition, timings=timings, handoff_at=time.time())

    async def check_health(self) -> None:
        # A tiny real forward on the device, without the VAE lock (VaeStage.check_health), off the event loop.
        await asyncio.to_thread(self.stage.check_health)

"""The TextEncoder deployment: one request's prompt (and negative prompt) → `TextEmbeddings`, with concurrent
requests batched (`serve.batch`).

The requests gathered into one batch are encoded in as few text-encoder forwards as stay bit-exact: prompts of the
same token length share an unpadded forward, a prompt that several requests share (the negative " ") is encoded
once, and every other prompt gets a forward of its own, exactly as `TextEncodeStage.encode` encodes it alone (the
measurements are in `lightray/stages/text_encoder.py` and docs/batching.md). The default `batch_wait_timeout_s` is
0: a batch is whatever queued while the previous one ran, so a lone request waits for nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
from PIL import Image
from ray import serve

from deployments.metrics import log_request, record_batch, record_queue_wait, record_stages
from lightray.config import load_preset
from lightray.contracts import TextEmbeddings
from lightray.engine.load import QueueWork
from lightray.stages import TextEncodeStage

MAX_BATCH_SIZE = 8
"""Requests per batch (at most the deployment's `max_ongoing_requests`, else the batch can never fill)."""
BATCH_WAIT_TIMEOUT_S = 0.0


@dataclasses.dataclass(frozen=True)
class PromptPair:
    """One request's input to the batch handler."""

    prompt: str
    negative_prompt: str | None = None


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    """The batch handler's output for one request."""

    prompt: np.ndarray
    negative: np.ndarray | None
    encode_ms: float
    """Milliseconds of the forwards that encoded this request's prompts."""
    started_at: float
    """Wall-clock start of the first of those forwards (the end of the request's queue wait)."""
    batch_requests: int
    """Requests in the batch this one was encoded with."""
    forwards: int
    """Text-encoder forwards that batch took."""


def encode_batch(stage: TextEncodeStage, items: list[PromptPair]) -> list[EncodedPair | Exception]:
    """Every request's embeddings, in the order of `items`, each bit-identical to `stage.encode` of its own
    prompts, from one forward per distinct token length (`TextEncodeStage.batch_plan`). If the batch fails, each
    request is retried alone, so a request that cannot be encoded fails only itself: its entry is the exception."""
    try:
        return _encode_all(stage, items)
    except Exception:
        if len(items) == 1:
            raise
    return [_alone(stage, item) for item in items]


def _alone(stage: TextEncodeStage, item: PromptPair) -> EncodedPair | Exception:
    try:
        return _encode_all(stage, [item])[0]
    except Exception as err:  # noqa: BLE001 - handed to that request's caller
        return err


def _encode_all(stage: TextEncodeStage, items: list[PromptPair]) -> list[EncodedPair]:
    for item in items:  # here, in the batch's thread: the tokenizer is not used from two threads at once
        stage.check_prompts(item.prompt, item.negative_prompt)
    prompts = [p for item in items for p in (item.prompt, item.negative_prompt) if p is not None]
    encoded: dict[str, np.ndarray] = {}
    forward_of: dict[str, int] = {}  # prompt → index of the forward that encoded it
    forwards: list[tuple[float, float]] = []  # per forward: wall-clock start, milliseconds
    plan = stage.batch_plan(prompts)
    for group in plan:
        started, t0 = time.time(), time.perf_counter()
        embeds = stage.encode_group(group)
        forwards.append((started, (time.perf_counter() - t0) * 1000.0))
        record_batch("encode", len(group))
        for prompt, emb in zip(group, embeds, strict=True):
            encoded[prompt], forward_of[prompt] = emb, len(forwards) - 1
    out = []
    for item in items:
        mine = {forward_of[p] for p in (item.prompt, item.negative_prompt) if p is not None}  # shared: once
        out.append(EncodedPair(
            prompt=encoded[item.prompt],
            negative=None if item.negative_prompt is None else encoded[item.negative_prompt],
            encode_ms=sum(forwards[f][1] for f in mine), started_at=min(forwards[f][0] for f in mine),
            batch_requests=len(items), forwards=len(plan),
        ))
    return out


@serve.deployment(name="TextEncoder")
class TextEncoder:
    def __init__(self, preset: dict, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_wait_timeout_s: float = BATCH_WAIT_TIMEOUT_S):
        self.stage = TextEncodeStage(load_preset(preset))
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.load = QueueWork(prior_s_per_unit=0.01)
        """Prompts queued and encoding here x seconds per prompt (deployments/autoscaling.py scales on it)."""

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's replica-reported metric: seconds of work in this replica's batch queue and forward."""
        return {"work_s": self.load.work_seconds()}

    async def encode(self, prompt: str, negative_prompt: str | None = None,
                     handoff_at: float | None = None) -> TextEmbeddings:
        """One request's embeddings (`negative` only when it has a negative prompt). `handoff_at`: when the ingress
        sent the request (wall-clock s); `encode_wait_ms` runs from it to the start of the forward that encoded
        this prompt (routing, the replica's queue, the batch queue, earlier forwards of the batch)."""
        self.load.add(1)
        try:
            out = await self._encode_batch(PromptPair(prompt, negative_prompt))
        except BaseException:
            self.load.done(1)
            raise
        self.load.done(1, None if isinstance(out, Exception) else out.encode_ms / 1000 / max(out.batch_requests, 1))
        if isinstance(out, Exception):
            raise out
        timings: dict[str, float] = {}
        record_queue_wait("encode", timings, handoff_at, started=out.started_at)
        timings["encode_ms"] = out.encode_ms
        record_stages(timings, "encode_ms")
        log_request("encode", prompts=1 if out.negative is None else 2,
                    tokens=len(out.prompt) + (0 if out.negative is None else len(out.negative)),
                    batch=out.batch_requests, forwards=out.forwards,
                    wait_ms=timings.get("encode_wait_ms"), encode_ms=timings["encode_ms"])
        return TextEmbeddings(out.prompt, out.negative, timings, time.time())

    async def encode_instruction(self, prompt: str, negative_prompt: str | None, images: list[np.ndarray],
                                 width: int, height: int, handoff_at: float | None = None) -> TextEmbeddings:
        """An edit's embeddings for an output of width × height: the prompt (and negative) read with the input
        images (uint8 [h, w, 3] each) by the VL encoder (`TextEncodeStage.encode_instruction`; 2.1's with its
        image slots). Not batched: each request's images are its own. In a worker thread, so the replica keeps
        taking requests."""
        timings: dict[str, float] = {}
        record_queue_wait("encode", timings, handoff_at)
        prompts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        t0 = time.perf_counter()
        text = await asyncio.to_thread(self.stage.encode_instruction, prompts,
                                       [Image.fromarray(im) for im in images], width, height)
        timings["encode_ms"] = (time.perf_counter() - t0) * 1000
        record_stages(timings, "encode_ms")
        log_request("encode", prompts=len(prompts), images=len(images),
                    tokens=sum(len(e) for e in (text.prompt, text.negative) if e is not None),
                    wait_ms=timings.get("encode_wait_ms"), encode_ms=timings["encode_ms"])
        return dataclasses.replace(text, timings=timings, handoff_at=time.time())

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def _encode_batch(self, items: list[PromptPair]) -> list[EncodedPair | Exception]:
        # In a worker thread: the replica's event loop keeps taking requests (and filling the next batch).
        return await asyncio.to_thread(encode_batch, self.stage, items)

    async def check_health(self) -> None:
        # A tiny real forward on the device (TextEncodeStage.check_health), off the event loop (Serve may run a
        # sync check_health on it): a broken device or model fails it.
        await asyncio.to_thread(self.stage.check_health)

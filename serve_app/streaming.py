"""`stream: true` on /v1/images/generations and /v1/images/edits: a backend's `StreamItem`s as server-sent events.

The events are OpenAI's (`openai.types.ImageGenPartialImageEvent`, `ImageGenCompletedEvent` and the `image_edit.*`
counterparts), with their fields, plus two extensions on each: `image_index` (which of the request's n images)
and `seed`. Every step also sends a `lightray.progress` event per image (step / total_steps), which code that
dispatches on the OpenAI event types skips. A failure after the stream started is sent as an `error` event in
OpenAI's error shape (`{"type": "error", "error": {"message", "type", "param", "code"}}`; the openai client
raises it as `APIError`), and it is always the stream's last event: a stream either ends with every image's
`completed` event or with an `error` event. docs/streaming.md describes the protocol.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi.responses import StreamingResponse

from lightray.errors import RequestError
from lightray.schemas import GenerationSpec
from serve_app.backend import GenerationResult, PartialImages, StepUpdate, StreamItem
from serve_app.errors import ServiceUnavailable, error_type, http_status
from serve_app.responses import ErrorBody

logger = logging.getLogger("lightray.api")

PROGRESS_EVENT = "lightray.progress"
"""Our own event type: one per image per denoising step."""
EVENT_PREFIXES = {"generation": "image_generation", "edit": "image_edit"}
"""OpenAI's event type prefix per endpoint."""


def sse(event: dict) -> bytes:
    """One server-sent event, named after its `type` (OpenAI's streams name every event so)."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def stream_response(kind: Literal["generation", "edit"], spec: GenerationSpec, items: AsyncIterator[StreamItem],
                    timeout_s: float, request_id: str, output_size: str) -> StreamingResponse:
    """The text/event-stream response for a validated, admitted request. `output_size`: "WxH" of the images
    sent (an edit with `padding_mask_crop` returns the input's size, not the spec's working size). The images are
    sent as `items` has them: an edit's backend has composed them (`lightray.edits`)."""
    events = image_events(kind, spec, items, timeout_s, request_id, output_size)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def image_events(kind: Literal["generation", "edit"], spec: GenerationSpec, items: AsyncIterator[StreamItem],
                       timeout_s: float, request_id: str, output_size: str) -> AsyncIterator[bytes]:
    """The SSE bytes for `items`, ended by an `error` event if they fail or run past `timeout_s`. If the client
    goes away, Starlette cancels this generator, and closing `items` cancels the work."""
    prefix = EVENT_PREFIXES[kind]
    # OpenAI's events say the request's settings: the quality tier of the model that draws ("auto" when the preset
    # gives it none), and opaque, which every image is.
    common = {"background": "opaque", "output_format": spec.output.format, "quality": spec.quality or "auto",
              "size": output_size}
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                item = await asyncio.wait_for(anext(items), timeout=max(deadline - time.monotonic(), 0))
            except StopAsyncIteration:
                return
            now = int(time.time())
            if isinstance(item, StepUpdate):
                for i, seed in enumerate(spec.seeds):
                    yield sse({"type": PROGRESS_EVENT, "created_at": now, "image_index": i, "seed": seed,
                               "step": item.step, "total_steps": item.total_steps})
            elif isinstance(item, PartialImages):
                for i, (seed, png) in enumerate(zip(spec.seeds, item.pngs)):
                    yield sse({"type": f"{prefix}.partial_image", "b64_json": _b64(png), **common, "created_at": now,
                               "partial_image_index": item.index, "image_index": i, "seed": seed})
            elif isinstance(item, GenerationResult):
                for i, (seed, png) in enumerate(zip(spec.seeds, item.images)):
                    yield sse({"type": f"{prefix}.completed", "b64_json": _b64(png), **common, "created_at": now,
                               "usage": _usage(spec), "image_index": i, "seed": seed})
    except asyncio.TimeoutError:
        yield sse(error_event(ErrorBody(message=f"{kind} did not finish within {timeout_s:g} s", type="server_error",
                                        param="request", code="timeout")))
    except Exception as err:  # noqa: BLE001 - every failure reaches the client as the stream's last event
        yield sse(error_event(error_body(err, request_id)))
    finally:
        await items.aclose()


def error_event(body: ErrorBody) -> dict:
    return {"type": "error", "error": body.model_dump()}


def error_body(err: Exception, request_id: str) -> ErrorBody:
    """What the API's exception handlers would answer for `err`, as the body of an error event."""
    if isinstance(err, RequestError):
        return ErrorBody(message=err.message, param=err.param, code=err.code, type=error_type(http_status(err)))
    if isinstance(err, ServiceUnavailable):
        return ErrorBody(message=str(err), type="server_error", code="unavailable")
    logger.error("unhandled error in a stream (request_id=%s)", request_id, exc_info=err)
    return ErrorBody(message=f"internal error; see the service logs (request id {request_id})", type="server_error",
                     code="internal_error")


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode("ascii")


def _usage(spec: GenerationSpec) -> dict:
    """OpenAI's `usage` (a required field of the completed events). Output tokens are the image's latent tokens
    (one per 16x16 pixels); input tokens are not counted here (0)."""
    image_tokens = (spec.width // 16) * (spec.height // 16)
    return {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
            "output_tokens": image_tokens, "total_tokens": image_tokens}

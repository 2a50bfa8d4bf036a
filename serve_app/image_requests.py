"""The one flow of an image request, shared by `/v1/images/generations` and `/v1/images/edits`: resolve the body
into the core request (`lightray.schemas.GenerationSpec`, frozen) for its caller, check the caller may ask for
its priority, charge its work to admission, pin its adapters, then stream it or await it and answer OpenAI's
`ImagesResponse`. Each router keeps only what differs: how it reads its body (JSON; multipart with image inputs)
and which backend call draws (`ImageWork`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

from fastapi import Depends, Request, Response
from fastapi.responses import StreamingResponse

from lightray.adapters import pin_adapters
from lightray.contracts import PRIORITIES, Priority
from lightray.registry import AdapterRegistry
from lightray.schemas import Caller, GenerationSpec, ImageGenerationRequest, lora_params
from serve_app.admission import Admission, pixel_work, request_work
from serve_app.auth import Principal
from serve_app.backend import GenerationBackend, GenerationResult, StreamItem
from serve_app.dependencies import admitted, get_image_store, get_principal, get_registry, get_settings
from serve_app.errors import Forbidden, RequestTimeout
from serve_app.image_store import ImageStore
from serve_app.observability import request_id_of
from serve_app.responses import ImageData, ImagesResponse
from serve_app.settings import ServiceSettings
from serve_app.streaming import stream_response

SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string", "description": "The event's `type`."},
    "data": {"type": "string", "description": "The event as JSON (docs/streaming.md)."},
}}
"""One server-sent event, as OpenAPI before 3.2 has a text/event-stream `schema` describe each event (schemathesis
checks every event of a streamed answer against it)."""
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
                         "description": "With `stream: true`: server-sent events (docs/streaming.md)."}}
"""The OpenAPI entry of a streamed answer (the same 200 as the JSON one, another media type)."""

RequestKind = Literal["generation", "edit"]
"""Which endpoint a request came to: names its stream's events and its timeout's message."""


@dataclasses.dataclass(frozen=True)
class ImageCall:
    """What the flow needs of one HTTP request to an image endpoint: the app's parts and the caller
    (`image_call`, a FastAPI dependency)."""

    request: Request
    response: Response
    """The answer's headers (`Server-Timing`) are set on it."""
    settings: ServiceSettings
    store: ImageStore
    """Where `response_format: url` images are kept."""
    registry: AdapterRegistry
    principal: Principal
    admission: Admission
    """The request's admission slot, charged with its work once resolved."""

    def caller(self) -> Caller:
        """The caller as the core request records it: tenant, default priority, and the request's id."""
        return Caller(tenant=self.principal.tenant, default_priority=self.principal.default_priority,
                      request_id=request_id_of(self.request))


def image_call(request: Request, response: Response, settings: ServiceSettings = Depends(get_settings),
               store: ImageStore = Depends(get_image_store), registry: AdapterRegistry = Depends(get_registry),
               principal: Principal = Depends(get_principal), admission: Admission = Depends(admitted)) -> ImageCall:
    return ImageCall(request, response, settings, store, registry, principal, admission)


@dataclasses.dataclass(frozen=True)
class ImageWork:
    """What one endpoint's request asks of the flow: how its body resolves, and which backend call draws it."""

    resolve: Callable[[int, Caller], GenerationSpec]
    """(default seed, caller) → the core request: the body checked against the model."""
    run: Callable[[GenerationSpec], Awaitable[GenerationResult]]
    """The backend's call for an answer in one piece."""
    stream: Callable[[GenerationSpec], AsyncIterator[StreamItem]]
    """The backend's call for a streamed answer."""
    output_size: Callable[[GenerationSpec], tuple[int, int]] = lambda spec: (spec.width, spec.height)
    """(width, height) of the images answered: the spec's, except an edit with `padding_mask_crop` (the input's)."""
    composes_outputs: bool = False
    """Whether the outputs are laid over the input image (inpainting), which is work the ingress does: charged as
    `pixel_work` of every output."""


async def serve_images(call: ImageCall, backend: GenerationBackend, body: ImageGenerationRequest,
                       kind: RequestKind, work: ImageWork, deadline: float | None = None
                       ) -> ImagesResponse | StreamingResponse:
    """The flow: resolve → check the priority → charge → pin the adapters → stream or await. `deadline`
    (`time.monotonic()`): when the request's clock started before (an edit's uploads are decoded within it); None,
    it starts now."""
    spec = work.resolve(secrets.randbelow(2**31), call.caller())
    _check_priority(call.principal, body.priority)
    width, height = work.output_size(spec)
    composed = len(spec.seeds) * width * height if work.composes_outputs else 0
    call.admission.charge(request_work(spec.denoise_params()) + pixel_work(composed))
    spec = await asyncio.to_thread(pin_adapters, spec, call.registry, backend.preset, lora_params(body.lora))
    if body.stream:
        return stream_response(kind, spec, work.stream(spec), _time_left(call.settings, deadline),
                               request_id_of(call.request), f"{width}x{height}")
    result = await within_timeout(work.run(spec), call.settings, kind, deadline)
    return _images_response(call, spec, result, body.response_format, (width, height))


def _check_priority(principal: Principal, priority: Priority | None) -> None:
    """A `priority` more urgent than the key's ceiling is 403 naming `priority`."""
    ceiling = principal.max_priority
    if priority is not None and ceiling is not None and PRIORITIES.index(priority) < PRIORITIES.index(ceiling):
        raise Forbidden("priority", f"priority: this API key may ask for {ceiling!r} at most, not {priority!r}",
                        code="forbidden")


def _time_left(settings: ServiceSettings, deadline: float | None) -> float:
    """Seconds the request has left: the configured request timeout from now, or until `deadline`."""
    return settings.request_timeout_s if deadline is None else max(deadline - time.monotonic(), 0.0)


async def within_timeout(work, settings: ServiceSettings, what: RequestKind, deadline: float | None = None):
    """Await the backend's work, ending it with 504 after the configured request timeout, or at `deadline`
    (`time.monotonic()`) when the request started its clock before (an edit's uploads are decoded within it)."""
    try:
        return await asyncio.wait_for(work, timeout=_time_left(settings, deadline))
    except asyncio.TimeoutError:
        raise RequestTimeout(
            "request", f"{what} did not finish within {settings.request_timeout_s:g} s", code="timeout",
        ) from None


def _images_response(call: ImageCall, spec: GenerationSpec, result: GenerationResult, response_format: str,
                     output_size: tuple[int, int]) -> ImagesResponse:
    """The OpenAI-shaped body for a finished generation or edit, plus its `Server-Timing` header. `output_size`:
    (width, height) of the images."""
    call.response.headers["Server-Timing"] = ", ".join(
        f"{k.removesuffix('_ms')};dur={v:.1f}" for k, v in result.timings.items()
    )
    base_url = call.settings.public_url or str(call.request.base_url).rstrip("/")
    data = []
    for seed, image in zip(spec.seeds, result.images):
        if response_format == "url":
            name = call.store.put(image, spec.output.format, spec.tenant)
            data.append(ImageData(url=f"{base_url}/v1/files/images/{name}", seed=seed))
        else:
            data.append(ImageData(b64_json=base64.b64encode(image).decode("ascii"), seed=seed))
    width, height = output_size
    return ImagesResponse(created=int(time.time()), data=data, background="opaque", output_format=spec.output.format,
                          quality=spec.quality, size=f"{width}x{height}", model=spec.model)

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Sequence

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import Response as RawResponse
from fastapi.responses import StreamingResponse

from lightray.adapters import resolve_adapters
from lightray.config import ModelPreset
from lightray.contracts import MEDIA_TYPES, PRIORITIES, Priority
from lightray.errors import NotFound
from lightray.registry import AdapterRegistry
from lightray.schemas import GenerationSpec, ImageData, ImageGenerationRequest, ImagesResponse, lora_params
from serve_app.admission import Admission, request_work
from serve_app.auth import Principal
from serve_app.dependencies import (
    admitted,
    get_models,
    get_image_store,
    get_principal,
    get_registry,
    get_settings,
)
from serve_app.errors import Forbidden, RequestTimeout
from serve_app.image_store import ImageStore, media_type_of
from serve_app.observability import request_id_of
from serve_app.openapi_errors import error_responses
from serve_app.served_models import ServedModels
from serve_app.settings import ServiceSettings
from serve_app.streaming import stream_response

router = APIRouter(prefix="/v1", tags=["images"])


SSE_EVENT_SCHEMA = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string", "description": "The event's `type`."},
    "data": {"type": "string", "description": "The event as JSON (docs/streaming.md)."},
}}
"""One server-sent event, as OpenAPI before 3.2 has a text/event-stream `schema` describe each event (schemathesis
checks every event of a streamed answer against it)."""
STREAM_RESPONSE = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
                         "description": "With `stream: true`: server-sent events (docs/streaming.md)."}}
"""The OpenAPI entry of a streamed answer (the same 200 as the JSON one, another media type)."""


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**STREAM_RESPONSE, **error_responses(400, 401, 403, 404, 422, 429, 503, 504)})
async def generate_images(
    body: ImageGenerationRequest,
    request: Request,
    response: Response,
    models: ServedModels = Depends(get_models),
    settings: ServiceSettings = Depends(get_settings),
    store: ImageStore = Depends(get_image_store),
    registry: AdapterRegistry = Depends(get_registry),
    principal: Principal = Depends(get_principal),
    admission: Admission = Depends(admitted),
) -> ImagesResponse | StreamingResponse:
    backend = models.for_request(body.model, "generations")
    spec = body.resolve(backend.preset, default_seed=secrets.randbelow(2**31))
    attribute_to(spec, principal, body.priority)
    admission.charge(request_work(spec.denoise_params()))
    await pin_adapters(spec, registry, backend.preset, principal.tenant, lora_params(body.lora))
    if body.stream:
        return stream_response("generation", spec, backend.generate_stream(spec), settings.request_timeout_s,
                               request_id_of(request), f"{spec.width}x{spec.height}")
    result = await within_timeout(backend.generate(spec), settings, "generation")
    return images_response(spec, result, body.response_format, request, response, settings, store)


def attribute_to(spec: GenerationSpec, principal: Principal, priority: Priority | None) -> None:
    """Set who the spec runs for: the caller's tenant, and the request's `priority` or else the caller's default.
    A `priority` more urgent than the key's ceiling is 403 naming `priority`."""
    ceiling = principal.max_priority
    if priority is not None and ceiling is not None and PRIORITIES.index(priority) < PRIORITIES.index(ceiling):
        raise Forbidden("priority", f"priority: this API key may ask for {ceiling!r} at most, not {priority!r}",
                        code="forbidden")
    spec.tenant = principal.tenant
    spec.priority = priority or principal.default_priority


async def pin_adapters(spec: GenerationSpec, registry: AdapterRegistry, preset: ModelPreset, tenant: str | None,
                       params: Sequence[str]) -> None:
    """Resolve the spec's adapters against the registry as `tenant` sees it (404 / 422 naming the request's entry,
    `params[i]`, before any replica work) and pin each to a concrete `tenant/name@vN`, keeping the order."""
    if spec.adapters:
        resolved = await asyncio.to_thread(resolve_adapters, registry, preset, spec.adapters, params, tenant)
        spec.adapters = tuple(adapter.use for adapter in resolved)


async def within_timeout(work, settings: ServiceSettings, what: str, deadline: float | None = None):
    """Await the backend's work, ending it with 504 after the configured request timeout, or at `deadline`
    (`time.monotonic()`) when the request started its clock before (an edit's uploads are decoded within it)."""
    timeout = settings.request_timeout_s if deadline is None else max(deadline - time.monotonic(), 0.0)
    try:
        return await asyncio.wait_for(work, timeout=timeout)
    except asyncio.TimeoutError:
        raise RequestTimeout(
            "request", f"{what} did not finish within {settings.request_timeout_s:g} s", code="timeout",
        ) from None


def images_response(spec, result, response_format: str, request: Request, response: Response,
                    settings: ServiceSettings, store: ImageStore,
                    output_size: tuple[int, int] | None = None) -> ImagesResponse:
    """The OpenAI-shaped body for a finished generation or edit, plus its `Server-Timing` header. `output_size`:
    (width, height) of the images when it is not the spec's (an edit with `padding_mask_crop`)."""
    response.headers["Server-Timing"] = ", ".join(
        f"{k.removesuffix('_ms')};dur={v:.1f}" for k, v in result.timings.items()
    )
    base_url = settings.public_url or str(request.base_url).rstrip("/")
    data = []
    for seed, image in zip(spec.seeds, result.images):
        if response_format == "url":
            name = store.put(image, spec.output.format, spec.tenant)
            data.append(ImageData(url=f"{base_url}/v1/files/images/{name}", seed=seed))
        else:
            data.append(ImageData(b64_json=base64.b64encode(image).decode("ascii"), seed=seed))
    width, height = output_size or (spec.width, spec.height)
    return ImagesResponse(created=int(time.time()), data=data, background="opaque", output_format=spec.output.format,
                          quality=spec.quality, size=f"{width}x{height}", model=spec.model)


@router.get("/files/images/{name}", response_class=RawResponse,
            responses={200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()},
                             "description": "The image, in the format the request asked for."},
                       **error_responses(404)})
async def get_image(name: str, store: ImageStore = Depends(get_image_store)) -> RawResponse:
    image = await asyncio.to_thread(store.get, name)  # a file read, which may wait for the image's write
    if image is None:
        raise NotFound("name", "no such image (expired or never existed)", code="not_found")
    return RawResponse(image, media_type=media_type_of(name))

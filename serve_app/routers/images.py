"""`POST /v1/images/generations` (OpenAI-compatible; its flow is `serve_app.image_requests`) and
`GET /v1/files/images/{name}`, where `response_format: url` images are fetched."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import Response as RawResponse
from fastapi.responses import StreamingResponse

from lightray.contracts import MEDIA_TYPES
from lightray.errors import NotFound
from lightray.schemas import ImageGenerationRequest
from serve_app.dependencies import get_image_store, get_models
from serve_app.image_requests import STREAM_RESPONSE, ImageCall, ImageWork, image_call, serve_images
from serve_app.image_store import ImageStore, media_type_of
from serve_app.openapi_errors import error_responses
from serve_app.responses import ImagesResponse
from serve_app.served_models import ServedModels

router = APIRouter(prefix="/v1", tags=["images"])


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={**STREAM_RESPONSE, **error_responses(400, 401, 403, 404, 422, 429, 503, 504)})
async def generate_images(
    body: ImageGenerationRequest,
    models: ServedModels = Depends(get_models),
    call: ImageCall = Depends(image_call),
) -> ImagesResponse | StreamingResponse:
    backend = models.for_request(body.model, "generations")
    work = ImageWork(resolve=lambda seed, caller: body.resolve(backend.preset, seed, caller=caller),
                     run=lambda spec: backend.generate(spec), stream=lambda spec: backend.generate_stream(spec))
    return await serve_images(call, backend, body, "generation", work)


@router.get("/files/images/{name}", response_class=RawResponse,
            responses={200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()},
                             "description": "The image, in the format the request asked for."},
                       **error_responses(404)})
async def get_image(name: str, store: ImageStore = Depends(get_image_store)) -> RawResponse:
    image = await asyncio.to_thread(store.get, name)  # a file read, which may wait for the image's write
    if image is None:
        raise NotFound("name", "no such image (expired or never existed)", code="not_found")
    return RawResponse(image, media_type=media_type_of(name))

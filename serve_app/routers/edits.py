"""`POST /v1/images/edits`, OpenAI-compatible, two ways by the model's family:

* an instruction-edit model (Qwen-Image-Edit): `prompt` is the instruction, `image` one to three pictures
  (`image[]` in OpenAI's clients), no mask (a `mask` is a 400 naming it: the Edit-Plus pipeline has none, and
  blending one in would be a different model's behaviour);
* a text-to-image model: img2img (image only) and inpainting (image + mask).

The body is multipart/form-data (what OpenAI's clients send: `image` and optional `mask` files plus text fields)
or application/json with the images as base64 or data URLs (`image` a string or a list). Everything is checked
before any replica work: the fields by `ImageEditRequest` (the generation fields plus `strength`), the uploads by
`lightray.images` (size in bytes, format, pixels before decoding, mask size and alpha), the output size against
the model preset. The pictures and mask go to the backend as uploaded: resizing, cropping and composing the output
are `lightray.edits`' work (img2img, inpainting), or the pipeline's (instruction edits), done by the backend.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from lightray.edits import output_size
from lightray.errors import RequestError, TooLarge
from lightray.images import ImageLimits, decode_edit_inputs, decode_upload, probe_uploads, to_rgb
from lightray.models.qwen_image_edit import MAX_INPUT_IMAGES
from lightray.schemas import ImageEditRequest
from serve_app.admission import pixel_work
from serve_app.backend import GenerationBackend
from serve_app.dependencies import get_models
from serve_app.errors import UnsupportedMediaType
from serve_app.image_requests import STREAM_RESPONSE, ImageCall, ImageWork, image_call, serve_images, within_timeout
from serve_app.openapi_errors import error_responses
from serve_app.responses import ImagesResponse
from serve_app.served_models import ServedModels
from serve_app.settings import ServiceSettings

router = APIRouter(prefix="/v1", tags=["images"])

FILE_FIELDS = ("image", "mask")
LIST_FIELDS = ("seeds",)
BOOL_FIELDS = tuple(name for name, field in ImageEditRequest.model_fields.items() if field.annotation is bool)
"""Form fields that are booleans (`stream`, `keep_unmasked`): a form sends "true" / "false" (what OpenAI's clients
send); any other text is passed on as text, which the strict boolean field refuses (400 naming it)."""
STRING_OR_LIST_FIELDS = ("lora",)
"""Fields that take one string or a list: given once (and not as `name[]`) a form field is the string; given
several times, as `name[]`, or as a JSON list, the list."""


def _openapi_body() -> dict[str, Any]:
    fields = ImageEditRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    encoded = {"type": "string", "description": "base64, or a data URL (data:image/png;base64,…)"}

    def schema(file_schema: dict, properties: dict) -> dict:
        return {
            "type": "object",
            "additionalProperties": False,  # as ImageEditRequest (extra="forbid"): unknown fields get 400
            "required": ["image", *fields.get("required", [])],
            "properties": {
                "image": {"anyOf": [file_schema, {"type": "array", "items": file_schema, "minItems": 1,
                                                  "maxItems": MAX_INPUT_IMAGES}],
                          "description": "The picture to edit: PNG, JPEG or WEBP. An instruction-edit model takes "
                                         f"1 to {MAX_INPUT_IMAGES} (`image[]`)."},
                "mask": {**file_schema, "description": "PNG/WEBP of the image's size; fully transparent pixels "
                                                       "(alpha 0) mark the area to repaint. Absent: img2img."},
                **properties,
            },
        }

    # A form sends a list as one part per entry, so an empty `lora` list is no part at all: the field left out,
    # which is valid. The form's schema must not call it invalid (the JSON body's keeps minItems: [] is a 400).
    form_properties = {**fields["properties"], "lora": {
        **fields["properties"]["lora"],
        "anyOf": [{k: v for k, v in member.items() if k != "minItems"}
                  for member in fields["properties"]["lora"]["anyOf"]],
    }}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": schema(binary, form_properties)},
        "application/json": {"schema": schema(encoded, fields["properties"])},
    }}}


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             openapi_extra=_openapi_body(),
             responses={**STREAM_RESPONSE, **error_responses(400, 401, 403, 404, 413, 415, 422, 429, 503, 504)})
async def edit_images(
    models: ServedModels = Depends(get_models),
    call: ImageCall = Depends(image_call),
) -> ImagesResponse | StreamingResponse:
    settings = call.settings
    fields, images_bytes, mask_bytes = await _read_body(call.request, settings)
    # The request's clock starts once its body is in: decoding the uploads runs within the timeout too.
    deadline = time.monotonic() + settings.request_timeout_s
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if not images_bytes:
        raise RequestError("image", "image is required (a PNG, JPEG or WEBP file)")
    backend = models.for_request(body.model, "edits")
    limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                         max_request_pixels=settings.max_request_image_pixels)
    if backend.preset.model_family.condition_tokens:
        work = await _instruction_work(body, images_bytes, mask_bytes, limits, backend, call, deadline)
    else:
        work = await _image_work(body, images_bytes, mask_bytes, limits, backend, call, deadline)
    return await serve_images(call, backend, body, "edit", work, deadline)


async def _image_work(body: ImageEditRequest, images_bytes: list[bytes], mask_bytes: bytes | None,
                      limits: ImageLimits, backend: GenerationBackend, call: ImageCall, deadline: float) -> ImageWork:
    """img2img (one picture) or inpainting (a picture and its mask): both checked and charged before they are
    decoded; the output takes the picture's size unless the request gives one."""
    if len(images_bytes) > 1:
        raise RequestError("image", f"model {body.model or backend.preset.model_ids[0]!r} edits one image "
                                    f"(img2img / inpainting); got {len(images_bytes)}")
    uploads = probe_uploads([("image", images_bytes[0])] + ([("mask", mask_bytes)] if mask_bytes is not None else []),
                            limits)
    call.admission.charge(pixel_work(sum(upload.pixels for upload in uploads)))
    image, mask = await within_timeout(asyncio.to_thread(decode_edit_inputs, *uploads), call.settings, "edit",
                                       deadline)
    return ImageWork(
        resolve=lambda seed, caller: body.resolve(backend.preset, seed, image.size, inpaint=mask is not None,
                                                  max_output_pixels=call.settings.max_image_pixels, caller=caller),
        run=lambda spec: backend.edit(spec, image, mask), stream=lambda spec: backend.edit_stream(spec, image, mask),
        output_size=lambda spec: output_size(spec, image.size), composes_outputs=mask is not None,
    )


async def _instruction_work(body: ImageEditRequest, images_bytes: list[bytes], mask_bytes: bytes | None,
                            limits: ImageLimits, backend: GenerationBackend, call: ImageCall,
                            deadline: float) -> ImageWork:
    """An instruction edit: every input image checked (`image[i]` names the one that fails) and charged before
    it is decoded; the spec resolved with the pipeline's output-size rule."""
    if mask_bytes is not None:
        raise RequestError("mask", f"model {backend.preset.name!r} edits by instruction and takes no mask; describe "
                                   "the change in the prompt")
    if len(images_bytes) > MAX_INPUT_IMAGES:
        raise RequestError("image", f"at most {MAX_INPUT_IMAGES} input images, got {len(images_bytes)}")

    names = ["image"] if len(images_bytes) == 1 else [f"image[{i}]" for i in range(len(images_bytes))]
    uploads = probe_uploads(list(zip(names, images_bytes)), limits)
    call.admission.charge(pixel_work(sum(upload.pixels for upload in uploads)))
    images = await within_timeout(asyncio.to_thread(lambda: [to_rgb(decode_upload(u)) for u in uploads]),
                                  call.settings, "edit", deadline)
    return ImageWork(
        resolve=lambda seed, caller: body.resolve_instruction(backend.preset, seed, [im.size for im in images],
                                                              caller=caller),
        run=lambda spec: backend.instruct(spec, images), stream=lambda spec: backend.instruct_stream(spec, images),
    )


# ------------------------------------------------------------------------------------------ body parsing

async def _read_body(request: Request, settings: ServiceSettings) -> tuple[dict, list[bytes], bytes | None]:
    """(text fields, every image's bytes in order, mask bytes) from a multipart or JSON body. Its size is bounded
    by the app's `BodyLimitMiddleware` (`edit_body_limit`: what the most images, base64-inflated, and the fields
    take)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _read_multipart(request, settings)
    if content_type == "application/json":
        return _read_json(await request.body(), settings)
    raise UnsupportedMediaType(
        "request", "send multipart/form-data (image and mask as files) or application/json (image and mask as "
        f"base64 or data URLs), not {content_type or 'no content type'}", code="unsupported_media_type")


async def _read_multipart(request: Request, settings: ServiceSettings) -> tuple[dict, list[bytes], bytes | None]:
    try:
        # One file more than an edit takes (its images and a mask), so one too many is counted and named below.
        form = await request.form(max_files=MAX_INPUT_IMAGES + 2, max_fields=64, max_part_size=256 * 1024)
    except HTTPException as e:  # starlette turns multipart errors into HTTPException(400)
        param = "image" if "files" in str(e.detail).lower() else "request"
        raise RequestError(param, f"malformed multipart body: {e.detail}") from None
    fields: dict[str, list] = {}
    files: dict[str, list[bytes]] = {}
    sent_as_list: set[str] = set()
    try:
        for key, value in form.multi_items():
            name = key.removesuffix("[]")  # OpenAI's clients send arrays as `name[]`
            if name != key:
                sent_as_list.add(name)
            if isinstance(value, UploadFile):
                if name not in FILE_FIELDS:
                    raise RequestError(name, f"{name} must be a text field, not a file")
                files.setdefault(name, []).append(await value.read(settings.max_image_bytes + 1))
            elif name in FILE_FIELDS:
                files.setdefault(name, []).append(_decode_base64(value, name, settings))
            else:
                fields.setdefault(name, []).append(value)
    finally:
        await form.close()
    return _flatten(fields, sent_as_list), files.get("image", []), _single(files, "mask")


def _flatten(fields: dict[str, list], sent_as_list: set[str] = frozenset()) -> dict[str, Any]:
    """The form's text fields as the JSON body would have them; `sent_as_list`: names sent as `name[]`."""
    out: dict[str, Any] = {}
    for name, values in fields.items():
        takes_list = name in LIST_FIELDS or name in STRING_OR_LIST_FIELDS
        if takes_list and len(values) == 1 and values[0].lstrip().startswith("["):  # no seed or adapter ref does
            try:
                out[name] = json.loads(values[0])
            except json.JSONDecodeError:
                raise RequestError(name, f"{name} must be a JSON list or repeated fields") from None
        elif name in LIST_FIELDS or (name in STRING_OR_LIST_FIELDS and (len(values) > 1 or name in sent_as_list)):
            out[name] = values
        elif len(values) > 1:
            raise RequestError(name, f"{name} is given {len(values)} times")
        elif name in BOOL_FIELDS and values[0] in ("true", "false"):
            out[name] = values[0] == "true"
        else:
            out[name] = values[0]
    return out


def _single(files: dict[str, list[bytes]], name: str) -> bytes | None:
    items = files.get(name, [])
    if len(items) > 1:
        raise RequestError(name, f"{name}: one {name} per request is supported, got {len(items)}")
    return items[0] if items else None


def _read_json(raw: bytes, settings: ServiceSettings) -> tuple[dict, list[bytes], bytes | None]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError("request", f"body is not valid JSON: {e}") from None
    except RecursionError:  # `[[[[…` within the body bound: the parser's recursion, not the server, gives out
        raise RequestError("request", "body nests too deeply to be an edit request") from None
    if not isinstance(body, dict):
        raise RequestError("request", "body must be a JSON object")
    images = body.pop("image", None)
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not isinstance(images, list) or not all(isinstance(v, str) for v in images):
        raise RequestError("image", "image must be a base64 string or data URL, or a list of them")
    if len(images) > MAX_INPUT_IMAGES:
        raise RequestError("image", f"at most {MAX_INPUT_IMAGES} input images, got {len(images)}")
    blobs = [_decode_base64(v, "image" if len(images) == 1 else f"image[{i}]", settings)
             for i, v in enumerate(images)]
    mask = body.pop("mask", None)
    if isinstance(mask, list) and len(mask) == 1:
        mask = mask[0]
    if mask is not None and not isinstance(mask, str):
        raise RequestError("mask", "mask must be a base64 string or a data URL")
    return body, blobs, None if mask is None else _decode_base64(mask, "mask", settings)


def _decode_base64(value: str, name: str, settings: ServiceSettings) -> bytes:
    text = value.strip()
    if text.startswith(("http://", "https://")):
        raise RequestError(name, f"{name}: URLs are not fetched; send the file, base64 or a data URL")
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(name, f"{name}: a data URL must look like data:image/png;base64,…")
    text = "".join(text.split())
    if len(text) > settings.max_image_bytes * 4 // 3 + 4:
        raise TooLarge(name, f"{name} is larger than {settings.max_image_bytes} bytes", code="image_too_large")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(name, f"{name} is not valid base64") from None

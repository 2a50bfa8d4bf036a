"""The bodies the images API answers with, in OpenAI's shapes plus Lightray's extension fields: images, the model
and adapter listings, and errors. The request bodies stay in the core (`lightray.schemas`), where the CLI's
in-process mode validates a request as the service does; nothing in the core answers HTTP."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from lightray.config import ModelPreset, QualityTier
from lightray.contracts import OutputFormat


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None
    seed: int = Field(description="The seed this image was generated with (extension).")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["opaque"] | None = Field(None, description="Always opaque.")
    output_format: OutputFormat | None = None
    quality: QualityTier | None = Field(None, description="The quality tier of the model that served the request "
                                        "(`GET /v1/models`: `qualities`); absent when it has none.")
    size: str | None = Field(None, description='"WxH" of the images.')
    model: str | None = Field(None, description="The model id that served the request (extension).")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lightray"
    # Extensions: what a client (the playground) needs to offer this model's settings.
    default_size: str | None = Field(None, description='"WxH" used when a request gives no size.')
    sizes: list[str] | None = Field(None, description="The served sizes when `sizes_exact`; otherwise common ones "
                                    "among the accepted (see `size_rule`).")
    sizes_exact: bool | None = Field(None, description="true: exactly `sizes` are served, any other is refused.")
    size_rule: str | None = Field(None, description="What sizes are accepted, in words.")
    size_multiple: int | None = None
    num_inference_steps: int | None = Field(None, description="Default denoising steps.")
    max_inference_steps: int | None = None
    true_cfg_scale: float | None = Field(None, description="Default true-CFG scale (1: no CFG).")
    max_images: int | None = Field(None, description="Largest `n`.")
    qualities: list[str] | None = Field(None, description="The request `quality` values that select this model "
                                        "when the request names no `model` (`auto`: the default model).")
    endpoints: list[str] | None = Field(None, description='The endpoints that serve this model: "generations" '
                                        '(`/v1/images/generations`), "edits" (`/v1/images/edits`).')
    edit_mode: Literal["instruction", "img2img"] | None = Field(
        None, description='How `/v1/images/edits` edits with this model: "instruction" (Qwen-Image-Edit: the '
        'prompt is an instruction about 1-3 input images), "img2img" (a text-to-image model: img2img, or '
        "inpainting with a `mask`).")
    input_images: list[int] | None = Field(None, description="Fewest and most input images an edit takes.")

    @classmethod
    def of(cls, preset: ModelPreset, model_id: str) -> "ModelCard":
        """The card of one of `preset`'s model ids, with its defaults and the preset's sizes."""
        variant = preset.variant(model_id)
        family = preset.model_family
        w, h = preset.default_size
        return cls(id=model_id, default_size=f"{w}x{h}", sizes=preset.size_names,
                   sizes_exact=preset.sizes is not None, size_rule=size_rule(preset),
                   size_multiple=preset.size_multiple, num_inference_steps=variant.num_inference_steps,
                   max_inference_steps=preset.max_inference_steps, true_cfg_scale=variant.true_cfg_scale,
                   max_images=preset.max_images_per_request, qualities=preset.qualities_of(model_id),
                   endpoints=list(family.endpoints),
                   edit_mode="instruction" if family.condition_tokens else "img2img",
                   input_images=list(family.input_images))


def size_rule(preset: ModelPreset) -> str:
    if preset.sizes is not None:
        return "exactly the listed sizes (the sizes the model was trained at)"
    return (f"width and height multiples of {preset.size_multiple} from {preset.min_side} to {preset.max_side}, at "
            f"most {preset.max_pixels} pixels, aspect ratio at most {preset.max_aspect_ratio:g}:1")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterInfo(BaseModel):
    """One published adapter version as `GET /v1/adapters` shows it (the manifest less its training details)."""

    id: str
    """`tenant/name@vN`, usable as a request's `lora`."""
    object: Literal["adapter"] = "adapter"
    tenant: str
    name: str
    version: int
    base_model_id: str
    rank: int | None = None
    alpha: float | None = None
    trigger_words: list[str]
    visibility: Literal["private", "public"]
    created: int
    """Unix time of publication."""
    metrics: dict[str, Any]

    @classmethod
    def of(cls, manifest) -> "AdapterInfo":
        return cls(
            id=manifest.ref, tenant=manifest.tenant, name=manifest.name, version=manifest.version,
            base_model_id=manifest.base_model_id, rank=manifest.rank, alpha=manifest.alpha,
            trigger_words=manifest.trigger_words, visibility=manifest.visibility,
            created=int(manifest.created_at.timestamp()), metrics=manifest.metrics,
        )


class AdapterList(BaseModel):
    """One page of `GET /v1/adapters` (OpenAI's list shape): ask for the next with `after=<last_id>`."""

    object: Literal["list"] = "list"
    data: list[AdapterInfo]
    has_more: bool = False
    """Whether more adapters follow this page."""
    first_id: str | None = None
    """The first adapter's id on this page; None when the page is empty."""
    last_id: str | None = None
    """The last adapter's id on this page: the next page's `after`."""


class AdapterDeleted(BaseModel):
    object: Literal["adapter.deleted"] = "adapter.deleted"
    deleted: list[str]
    """The refs removed, `tenant/name@vN` each."""


class ErrorBody(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

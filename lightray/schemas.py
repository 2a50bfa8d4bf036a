"""The images API's request fields, and the core request they resolve into.

`ImageGenerationRequest` and `ImageEditRequest` are the requests' fields (OpenAI's, plus Lightray's extensions)
with their field-level checks (types, ranges, formats). They stay in the core, not at the edge, because the CLI's
in-process mode (`lightray generate --local`, `lightray edit --local`) checks a request exactly as the service
does; the bodies the service answers with are the edge's (`serve_app.responses`). `resolve` checks a request
against the served model (size limits, model ids, step limits) and builds the core request, a frozen
`GenerationSpec` (or `EditSpec`), once: every later representation (`DenoiseParams`, the prompts to encode) is
derived from it. Every failure names the field it is about (`lightray.errors`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

from lightray.config import ModelPreset, QualityTier, parse_width_height
from lightray.contracts import (
    MAX_STACKED_ADAPTERS,
    PNG,
    AdapterUse,
    DenoiseParams,
    OutputEncoding,
    OutputFormat,
    Priority,
    denoising_steps,
)
from lightray.errors import NotFound, RequestError
from lightray.registry import AdapterRef, InvalidAdapterRef

MAX_SEED = 2**63 - 1
SIZE_PATTERN = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"
"""The size field's form, as documented in the OpenAPI schema; the limits are checked against the preset."""
_ADAPTER_ENTRY = re.compile(r"^(?P<ref>[^:]+)(?::(?P<scale>-?[0-9]*\.?[0-9]+))?$")
MAX_ADAPTER_SCALE = 4.0
"""Largest |scale| a `lora` entry may ask for."""
LoraEntry = Annotated[str, Field(min_length=1)]
"""One `lora` entry, 'tenant/name[@version][:scale]'. Non-empty: "" is not a way to say "no adapter" (omit the
field), and would otherwise reach the denoiser as an adapter name."""
LoraField = LoraEntry | Annotated[list[LoraEntry], Field(min_length=1, max_length=MAX_STACKED_ADAPTERS)] | None
"""The `lora` field: one entry, or a list of entries stacked in order."""
MAX_PARTIAL_IMAGES = 3
"""Most previews a streamed request may ask for (OpenAI's `partial_images` range is 0-3)."""


class ImageGenerationRequest(BaseModel):
    """Body of `POST /v1/images/generations`. OpenAI fields first, then Lightray's extensions."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: str = Field(min_length=1, description="What to draw (English or Chinese).")
    model: str | None = Field(None, description="Model id from GET /v1/models; default: the first.")
    n: int = Field(1, ge=1, le=10, description="Number of images (one denoiser batch).")
    size: str | None = Field(None, description='"WIDTHxHEIGHT", one of the model\'s served sizes (`GET /v1/models`: '
                             '`sizes`, `size_rule`).', json_schema_extra={"pattern": SIZE_PATTERN})
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: Literal["low", "medium", "high", "auto"] | None = Field(
        None, description="Without `model`: which of the model's variants draws (`GET /v1/models`: each model's "
        "`qualities`; for the embedded model low = Lightning 4, medium = Lightning 8, high = the base with true CFG; "
        "`auto` or none: the default model). With `model`: accepted, and the named model draws.",
    )
    style: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")
    user: str | None = Field(None, max_length=256, description="Accepted for OpenAI compatibility; ignored.")
    output_format: OutputFormat = Field("png", description="The images' format, in `b64_json`, at the URL and in "
                                        "streamed events.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="JPEG and WebP only: the encoder's quality, 0-100 (100: least loss). "
        "Default 100. With `png` (the default format) it is a 400: PNG is lossless.",
    )
    background: Literal["opaque", "auto"] | None = Field(
        None, description="`opaque` or `auto` (the images are opaque); `transparent` is not supported (400).",
    )
    stream: StrictBool = Field(
        False, description="Answer text/event-stream: per image, `partial_images` previews, then the final image "
        "(OpenAI's `image_generation.*` / `image_edit.*` events), plus `lightray.progress` step events "
        "(docs/streaming.md).",
    )
    partial_images: int | None = Field(
        None, ge=0, le=MAX_PARTIAL_IMAGES,
        description="With `stream`: previews per image, spread over the steps (fewer when the request runs fewer "
        "steps than that plus one). Default 0.",
    )
    # Extensions.
    preview: Literal["fast", "full"] | None = Field(
        None,
        description='With `partial_images`: how previews are made. "fast": a latent-to-RGB projection, a quarter of '
        'the image\'s side, far cheaper than a decode; "full": decoded by the VAE at full size, as the final image '
        "is (each costs a decode). Default: the model's (`fast` unless its preset says otherwise). The final image "
        "is the same either way.",
    )
    negative_prompt: str | None = Field(None, description="What not to draw (enables true CFG with scale > 1).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i uses seed + i.")
    seeds: list[int] | None = Field(None, description="One seed per image (overrides `seed`); length must be n.")
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps; default per model.")
    true_cfg_scale: float | None = Field(None, ge=1.0, le=20.0, description="True CFG scale; 1 disables CFG.")
    lora: LoraField = Field(
        None,
        description=f"Tenant adapter 'tenant/name[@version][:scale]' applied on top of the model, or a list of at "
        f"most {MAX_STACKED_ADAPTERS} such adapters stacked in order, each adapter at most once. An empty list is "
        "a 400 (leave the field out for no adapter). Errors about one entry of a list name it as `lora[i]`.",
    )
    priority: Priority | None = Field(
        None,
        description="Scheduling class: `interactive` is served first; `batch` runs when there is room and may be "
        "paused between steps for interactive work. Default: the API key's priority. A class more urgent than the "
        "key's `max_priority` (by default its priority: a `batch` key cannot ask for `interactive`) is a 403.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be blank")
        return v

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_shape(cls, v: Any) -> Any:
        """The field's shape, checked before pydantic's union so that an error names the entry at fault (the
        error context's `param`, which the API puts in `error.param`) instead of pydantic's per-member loc."""
        if v is None or isinstance(v, str):
            if v == "":
                raise PydanticCustomError("invalid_lora", "lora must not be empty; leave it out for no adapter")
            return v
        if not isinstance(v, list):
            raise PydanticCustomError("invalid_lora", "lora must be a string or a list of strings")
        if not v:
            raise PydanticCustomError("invalid_lora", "lora must not be an empty list; leave it out for no adapter")
        if len(v) > MAX_STACKED_ADAPTERS:
            raise PydanticCustomError("invalid_lora", "lora stacks at most {limit} adapters, got {count}",
                                      {"limit": MAX_STACKED_ADAPTERS, "count": len(v)})
        for i, entry in enumerate(v):
            if not isinstance(entry, str) or not entry:
                raise PydanticCustomError(
                    "invalid_lora", "{param} must be a non-empty string 'tenant/name[@version][:scale]'",
                    {"param": lora_params(v)[i]},
                )
        return v

    @model_validator(mode="before")
    @classmethod
    def _numbers_not_booleans(cls, data: Any) -> Any:
        """pydantic's lax int and float take true/false as 1/0; a boolean where a number goes (`seed`, `n`,
        `partial_images`, a `seeds` entry…) is a client's mistake, and the OpenAPI schema says so (schemathesis
        sends them as schema-violating)."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if field is None or not _takes_numbers(field.annotation):
                    continue
                entries = enumerate(value) if isinstance(value, list) else [(None, value)]
                for i, entry in entries:
                    if isinstance(entry, bool):
                        raise PydanticCustomError("invalid_number", "{param} must be a number, not a boolean",
                                                  {"param": name if i is None else f"{name}[{i}]"})
        return data

    @field_validator("background", mode="before")
    @classmethod
    def _background_opaque(cls, v: Any) -> Any:
        # OpenAI's third value, named in the message rather than left to the enum's generic one.
        if v == "transparent":
            raise ValueError("background: transparent is not supported (the model draws opaque images); send "
                             "opaque or auto")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(s < 0 or s > MAX_SEED for s in v):
            raise ValueError(f"every seed must be in [0, {MAX_SEED}]")
        return v

    @model_validator(mode="after")
    def _seeds_match_n(self) -> "ImageGenerationRequest":
        if self.seeds is not None and len(self.seeds) != self.n:
            raise ValueError(f"seeds: {len(self.seeds)} seeds given for n={self.n}")
        if self.partial_images and not self.stream:
            raise ValueError("partial_images: previews are streamed; send \"stream\": true with partial_images")
        if self.stream and self.response_format == "url":
            raise ValueError("response_format: a stream sends every image as b64_json; leave response_format out")
        if self.output_compression is not None and self.output_format == "png":
            raise ValueError("output_compression: only jpeg and webp are compressed; with png (the default "
                             "output_format) leave output_compression out")
        return self

    @property
    def output_encoding(self) -> OutputEncoding:
        """How the images are encoded (`output_format`, `output_compression`)."""
        if self.output_compression is None:
            return OutputEncoding(self.output_format)
        return OutputEncoding(self.output_format, self.output_compression)

    def resolve(self, preset: ModelPreset, default_seed: int, *, caller: "Caller | None" = None) -> "GenerationSpec":
        """Check the request against the served model and build the core request, defaults filled in, for
        `caller` (by default an anonymous one: no tenant, interactive, no request id)."""
        caller = caller or Caller()
        try:
            # Only a request that names no model lets `quality` choose (ModelPreset.quality_variants).
            variant = preset.variant(self.model) if self.model is not None else preset.variant_for_quality(self.quality)
        except KeyError:
            if (refusal := preset.unserved_refusal(self.model)) is not None:
                raise RequestError("model", refusal) from None
            raise NotFound(
                "model", f"model {self.model!r} does not exist; available: {', '.join(preset.model_ids)}",
                code="model_not_found",
            ) from None
        if len(self.prompt) > preset.max_prompt_chars:
            raise RequestError("prompt", f"prompt is longer than {preset.max_prompt_chars} characters")
        if self.negative_prompt is not None and len(self.negative_prompt) > preset.max_prompt_chars:
            raise RequestError("negative_prompt", f"negative_prompt is longer than {preset.max_prompt_chars} characters")
        if self.n > preset.max_images_per_request:
            raise RequestError("n", f"n must be at most {preset.max_images_per_request}")
        width, height = parse_size(self.size, preset)
        steps = self.num_inference_steps or variant.num_inference_steps
        if steps > preset.max_inference_steps:
            raise RequestError("num_inference_steps", f"num_inference_steps must be at most {preset.max_inference_steps}")
        cfg = variant.true_cfg_scale if self.true_cfg_scale is None else self.true_cfg_scale
        negative = self.negative_prompt
        if cfg > 1 and negative is None:
            negative = variant.negative_prompt
        if self.seeds is not None:
            seeds = list(self.seeds)
        else:
            base = default_seed if self.seed is None else self.seed
            seeds = [(base + i) % (MAX_SEED + 1) for i in range(self.n)]
        return GenerationSpec(
            prompt=self.prompt, negative_prompt=negative if cfg > 1 else None, model=variant.id, seeds=tuple(seeds),
            width=width, height=height, num_inference_steps=steps, true_cfg_scale=cfg,
            adapters=parse_lora_field(self.lora), priority=self.priority or caller.default_priority,
            tenant=caller.tenant, request_id=caller.request_id, partial_images=self.partial_images or 0,
            preview=self.preview or preset.default_preview,
            output=self.output_encoding, quality=preset.quality_tier(variant.id, self.quality),
        )


def _takes_numbers(annotation: Any) -> bool:
    """Whether a field's type is, or holds, int or float (`int | None`, `list[int]`; not bool, not Literal's
    values)."""
    return annotation in (int, float) or any(_takes_numbers(arg) for arg in get_args(annotation))


def lora_params(value: str | list[str] | None) -> tuple[str, ...]:
    """The error `param` of each adapter of a `lora` field, in order: "lora" for a single string, "lora[i]" for the
    entries of a list."""
    if value is None:
        return ()
    if isinstance(value, str):
        return ("lora",)
    return tuple(f"lora[{i}]" for i in range(len(value)))


def _parse_adapter_entry(value: str, param: str) -> tuple[AdapterRef, AdapterUse]:
    """One `lora` entry, 'tenant/name[@version][:scale]' → (its parsed ref, AdapterUse with the ref as written, not
    yet pinned to a version, and the scale): 400 naming `param` when it is malformed."""
    m = _ADAPTER_ENTRY.match(value.strip())
    if not m:
        raise RequestError(param, f"{param} must look like 'tenant/name[@version][:scale]', got {value!r}")
    scale = float(m.group("scale")) if m.group("scale") else 1.0
    if not -MAX_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE:
        raise RequestError(param, f"{param} scale must be within ±{MAX_ADAPTER_SCALE:g}, got {scale:g}")
    try:
        ref = AdapterRef.parse(m.group("ref"))
    except InvalidAdapterRef as err:
        raise RequestError(param, f"{param}: {err}") from None
    return ref, AdapterUse(ref=m.group("ref"), scale=scale)


def parse_lora_field(value: str | list[str] | None) -> tuple[AdapterUse, ...]:
    """The request's `lora` field (one entry or a list of them) → its adapters in order, not yet pinned: 400 for
    a malformed entry or an adapter listed twice (whatever its versions and scales: one adapter, one delta),
    naming the entry (`lora`, or `lora[i]` of the second occurrence)."""
    if value is None:
        return ()
    entries = [value] if isinstance(value, str) else value
    adapters: list[AdapterUse] = []
    first_seen: dict[tuple[str, str], str] = {}
    for entry, param in zip(entries, lora_params(value)):
        ref, adapter = _parse_adapter_entry(entry, param)
        key = (ref.tenant, ref.name)
        if key in first_seen:
            raise RequestError(param, f"{param}: adapter '{ref.tenant}/{ref.name}' is already {first_seen[key]}; "
                                      "stack each adapter once")
        first_seen[key] = param
        adapters.append(adapter)
    return tuple(adapters)


def parse_size(size: str | None, preset: ModelPreset) -> tuple[int, int]:
    if size is None or size == "auto":
        return preset.default_size
    try:
        width, height = parse_width_height(size)
    except ValueError:
        raise RequestError("size", f'size must look like "WIDTHxHEIGHT" (e.g. "128x128"), got {size!r}') from None
    if (refusal := preset.size_refusal(width, height)) is not None:
        raise RequestError("size", f"size: {refusal}")
    return width, height


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who sends a request, as the ingress knows it before it reads the body: what the core request records of
    its sender."""

    tenant: str | None = None
    """The API key's tenant, for fairness between tenants and the adapters it may use; None when auth is off (and
    in process)."""
    default_priority: Priority = "interactive"
    """The scheduling class of a request that names none (the API key's `priority`). A request's own `priority`
    is the edge's to check against the key's ceiling (`serve_app.image_requests`)."""
    request_id: str | None = None
    """The ingress's request id (`x-request-id`): the Denoiser's and the engine's log lines about the request
    carry it."""


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """The core request: a validated, fully resolved generation, built once (`ImageGenerationRequest.resolve`) and
    never changed in place (a change is a new spec, `dataclasses.replace`). What the stages run derives from it:
    the prompts to encode (`prompts`), the denoiser's `DenoiseParams` (`denoise_params`), the previews' steps."""

    prompt: str
    model: str
    """Model id of the variant that draws (`ModelPreset.variant`)."""
    seeds: tuple[int, ...]
    """One per image, explicit; the number of images is their count. A list is taken as its tuple."""
    width: int
    height: int
    num_inference_steps: int
    """Length of the schedule; an image input runs only its last `strength` (`total_steps`)."""
    true_cfg_scale: float
    negative_prompt: str | None = None
    """The negative prompt, when true CFG is on (`true_cfg_scale` > 1); None otherwise."""
    adapters: tuple[AdapterUse, ...] = ()
    """Tenant adapters, stacked in this order: refs as the request wrote them once resolved; pinned to their
    concrete `tenant/name@vN` and manifest checksum by `lightray.adapters.pin_adapters`."""
    strength: float = 1.0
    """The fraction of the schedule run from a noised input image (diffusers' `strength`): 1 for a generation;
    an edit's from its request (`EditSpec`)."""
    priority: Priority = "interactive"
    """Scheduling class: the request's `priority`, or else its caller's default (`Caller`)."""
    tenant: str | None = None
    """Who asked (the API key's tenant), for fairness between tenants; None when auth is off."""
    request_id: str | None = None
    """The ingress's request id, for the log lines of every stage that handles the request."""
    partial_images: int = 0
    """Previews per image for a streamed request (the engine reports x0-predictions after `preview_steps()`)."""
    preview: Literal["fast", "full"] = "fast"
    """How those previews are made: "fast", the VAE stage's latent-to-RGB projection (`VaeStage.preview`, a quarter
    of the side); "full", the VAE decode (`VaeStage.decode`, full size)."""
    output: OutputEncoding = PNG
    """How the images (and previews) are encoded: OpenAI's `output_format` and `output_compression`."""
    quality: QualityTier | None = None
    """The quality tier of the model that draws (`ModelPreset.quality_tier`), as OpenAI's responses report it;
    None when the preset maps no tier to it."""

    def __post_init__(self) -> None:
        # Frozen all the way down: seeds given as a list (a convenience for callers) are kept as a tuple.
        object.__setattr__(self, "seeds", tuple(self.seeds))

    @property
    def total_steps(self) -> int:
        """Denoising steps this request runs (`lightray.contracts.denoising_steps`)."""
        return denoising_steps(self.num_inference_steps, self.strength)

    def preview_steps(self) -> tuple[int, ...]:
        """The steps after which a preview is taken: `partial_images` of them spread evenly over the run, never
        the last (whose x0-prediction is the final image)."""
        return preview_steps(self.total_steps, self.partial_images)

    def prompts(self) -> list[str]:
        """What the text encoder encodes: the prompt, and the negative prompt when true CFG is on."""
        return [self.prompt] if self.negative_prompt is None else [self.prompt, self.negative_prompt]

    def denoise_params(self) -> DenoiseParams:
        """What the denoiser needs of this request (`lightray.contracts.DenoiseParams`)."""
        return DenoiseParams(
            seeds=self.seeds, width=self.width, height=self.height, num_inference_steps=self.num_inference_steps,
            true_cfg_scale=self.true_cfg_scale, variant=self.model, adapters=self.adapters, strength=self.strength,
            priority=self.priority, tenant=self.tenant, preview_steps=self.preview_steps(),
            request_id=self.request_id,
        )


def preview_steps(total_steps: int, partial_images: int) -> tuple[int, ...]:
    """`partial_images` steps (1-based) spread evenly over `total_steps`, excluding the last: step
    round(k·T/(N+1)) for k = 1..N, without repeats. Lightning 4 with 3 previews: 1, 2, 3; 8 steps: 2, 4, 6; 30
    steps: 8, 15, 22. A run of T steps has at most T - 1 previews."""
    steps = {round(k * total_steps / (partial_images + 1)) for k in range(1, partial_images + 1)}
    return tuple(sorted(s for s in steps if 1 <= s < total_steps))


# ----------------------------------------------------------------------------------------- image edits

DEFAULT_IMG2IMG_STRENGTH = 0.6
"""diffusers' QwenImageImg2ImgPipeline default. With the 4-step default model it keeps 3 of 4 steps; 0.8 would keep
all 4 and start from pure noise (strength is quantised to whole steps), ignoring the image."""
DEFAULT_INPAINT_STRENGTH = 1.0
"""The masked area starts from pure noise (conventional for inpainting); the rest is kept from the image."""


class ImageEditRequest(ImageGenerationRequest):
    """Fields of `POST /v1/images/edits` (multipart form fields, or the JSON body less `image` / `mask`): those of
    generations plus `strength`. Without `size` the output takes the input image's size. The image and mask
    themselves are checked by `lightray.images`."""

    size: str | None = Field(
        None, description='"WIDTHxHEIGHT" to resize the input to (one of the model\'s served sizes); '
        "default: the input image's size, or for a model served at exact sizes the served size nearest it (aspect "
        "ratio first, then pixel count).", json_schema_extra={"pattern": SIZE_PATTERN},
    )
    strength: float | None = Field(
        None, gt=0.0, le=1.0,
        description=f"How much of the schedule to run from the noised input: 1 ignores the image (or the masked "
        f"area's content). Default {DEFAULT_IMG2IMG_STRENGTH} (img2img), {DEFAULT_INPAINT_STRENGTH} (inpainting).",
    )
    padding_mask_crop: int | None = Field(
        None, ge=0, le=8192,
        description="Inpainting only: work on the mask's bounding box grown by this many pixels (and to the aspect "
        "of `size`) at `size` (default: the model's default size), then paste the result back into the full "
        "image, which is what is returned (diffusers' `padding_mask_crop`). Lets a small model edit a large "
        "picture; outside the crop box the pixels are the input's, exactly.",
    )
    mask_blur: int | None = Field(
        None, ge=0, le=64,
        description="Inpainting only: Gaussian blur radius applied to the mask first (diffusers' "
        "`mask_processor.blur`). The latent blend uses the mask binarised, so this mostly sets the soft edge of "
        "the `keep_unmasked` overlay and of the `padding_mask_crop` paste-back, which use the blurred mask as "
        "their alpha (0: a hard edge). Default: no blur, and the overlay's edge is a 2-pixel box feather.",
    )
    keep_unmasked: StrictBool = Field(
        True,
        description="Inpainting only: lay the input back over the output outside the mask (A1111's overlay, "
        "diffusers' `apply_overlay`), so what the mask does not cover is the input's pixels rather than the VAE's "
        "softened reconstruction of them. The overlay's edge is soft: without `mask_blur`, every pixel with no "
        "mask pixel within 2 px horizontally and vertically is the input exactly, and the model's share ramps "
        "over the 2 px either side of the mask's border; with `mask_blur`, the blurred mask is the overlay. "
        "false: the model's output as decoded (with `padding_mask_crop`, the whole crop box is the model's).",
    )
    input_fidelity: str | None = Field(None, description="Accepted for OpenAI compatibility; ignored.")

    def resolve(self, preset: ModelPreset, default_seed: int, image_size: tuple[int, int] | None = None,
                inpaint: bool = False, max_output_pixels: int | None = None, *,
                caller: Caller | None = None) -> "EditSpec":
        """`ImageGenerationRequest.resolve` with the output size defaulting to `image_size` (width, height).
        `max_output_pixels`: the most pixels all of the request's outputs together may have where they are not
        the model's size (`padding_mask_crop` returns the input's size); None: unchecked."""
        request: ImageGenerationRequest = self
        if self.padding_mask_crop is not None and not inpaint:
            raise RequestError("padding_mask_crop", "padding_mask_crop needs a mask (it crops around the edit area)")
        if self.mask_blur is not None and not inpaint:
            raise RequestError("mask_blur", "mask_blur needs a mask")
        if self.size in (None, "auto") and self.padding_mask_crop is None:
            if image_size is None:
                raise ValueError("image_size is required when the request gives no size")
            # A model served at exact sizes works at the one nearest the input's (aspect ratio first); a model that
            # accepts a range refuses an input outside it rather than guess.
            width, height = preset.nearest_size(*image_size) if preset.sizes is not None else image_size
            size = f"{width}x{height}"
            try:
                parse_size(size, preset)
            except RequestError as e:
                raise RequestError(
                    "image", f"image is {size} and no `size` was given, so the output would be too: "
                    f"{e.message.removeprefix('size: ')}; pass `size` to resize the input"
                ) from None
            request = self.model_copy(update={"size": size})
        base = ImageGenerationRequest.resolve(request, preset, default_seed, caller=caller)
        if self.padding_mask_crop is not None and max_output_pixels is not None:
            if image_size is None:
                raise ValueError("image_size is required with padding_mask_crop")
            width, height = image_size
            if width * height * len(base.seeds) > max_output_pixels:
                raise RequestError("image", f"with padding_mask_crop the {len(base.seeds)} outputs have the image's "
                                            f"size ({width}x{height}): at most {max_output_pixels} pixels in all")
        strength = self.strength
        if strength is None:
            strength = DEFAULT_INPAINT_STRENGTH if inpaint else DEFAULT_IMG2IMG_STRENGTH
        # Field by field, not `dataclasses.asdict`: that would turn the AdapterUse entries into dicts.
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        return EditSpec(**{**fields, "strength": strength}, padding_mask_crop=self.padding_mask_crop,
                        mask_blur=self.mask_blur, keep_unmasked=self.keep_unmasked)

    def resolve_instruction(self, preset: ModelPreset, default_seed: int, image_sizes: Sequence[tuple[int, int]], *,
                            caller: Caller | None = None) -> "GenerationSpec":
        """An instruction edit (a family with condition images, `QwenImageEditPlusPipeline`): the generation fields
        checked as `ImageGenerationRequest.resolve` checks them, the input images' count against the family's, and
        without `size` the pipeline's rule: the last image's aspect ratio at the area of the preset's default size,
        sides multiples of 32, snapped to the nearest served size. The img2img / inpainting fields do not apply."""
        low, high = preset.model_family.input_images
        if not low <= len(image_sizes) <= high:
            raise RequestError("image", f"this model edits {low} to {high} input images, got {len(image_sizes)}")
        for name in ("strength", "padding_mask_crop", "mask_blur"):
            if getattr(self, name) is not None:
                raise RequestError(name, f"{name} applies to img2img and inpainting, not to an instruction-edit "
                                         f"model such as {preset.name!r}")
        request: ImageGenerationRequest = self
        if self.size in (None, "auto"):
            from lightray.models.qwen_image_edit import calculate_dimensions

            width, height = image_sizes[-1]
            area = preset.default_size[0] * preset.default_size[1]
            width, height = calculate_dimensions(area, width / height)
            if preset.sizes is not None:
                width, height = preset.nearest_size(width, height)
            request = self.model_copy(update={"size": f"{width}x{height}"})
        return ImageGenerationRequest.resolve(request, preset, default_seed, caller=caller)


@dataclasses.dataclass(frozen=True)
class EditSpec(GenerationSpec):
    """A resolved image edit: a generation that starts from an input image (img2img, or inpainting with a mask
    that the backend carries alongside), `strength` of the way (`ImageEditRequest.resolve`: the request's, or
    `DEFAULT_IMG2IMG_STRENGTH` / `DEFAULT_INPAINT_STRENGTH`)."""

    padding_mask_crop: int | None = None
    """Set: width×height is the working size of a crop around the mask, pasted back into the full input image
    (`lightray.edits`); the output has the input image's size."""
    mask_blur: int | None = None
    """Gaussian blur radius applied to the mask before anything else; set, the blurred mask is also the overlay's
    alpha (`lightray.edits.overlay_mask`)."""
    keep_unmasked: bool = True
    """Inpainting: lay the input back over the output outside the mask (`lightray.edits.compose_edit`)."""

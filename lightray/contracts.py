"""The typed objects that cross stage boundaries (Ray Serve handles, or plain calls in one process).

Every object here is frozen and carries only numpy arrays and scalars: no torch, so the ingress can import this
module without loading torch. The flow is one way:

    DenoiseParams + TextEmbeddings (+ ImageLatents, mask | ConditionLatents) --Denoiser--> DenoisedLatents
        --VaeDecoder--> DecodedImages

`timings` (milliseconds per stage) and `handoff_at` (wall-clock seconds when the producing stage finished, for the
next stage's queue-wait metric) travel with the data so the ingress can report where a request's time went.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import numpy as np

Priority = Literal["interactive", "batch"]
"""Scheduling class of a request. `interactive` rows are scheduled before `batch` rows whenever the engine's
per-step budget is full; `batch` rows are then paused at a step boundary and resume later (docs/engine.md)."""
PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")
"""Every priority, most urgent first (the index is the scheduling rank)."""

MAX_STACKED_ADAPTERS = 4
"""Most tenant adapters one request may stack (the API's `lora` list)."""

OutputFormat = Literal["png", "jpeg", "webp"]
"""An image format the API answers in (OpenAI's `output_format`)."""
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp")
MEDIA_TYPES: dict[OutputFormat, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
"""The Content-Type of each output format."""
FILE_EXTENSIONS: dict[OutputFormat, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
"""The file extension of each output format (the image store's file names)."""
DEFAULT_COMPRESSION = 100
"""`output_compression` when a JPEG or WebP request gives none (OpenAI's documented default)."""


@dataclasses.dataclass(frozen=True)
class OutputEncoding:
    """How a request's images are encoded (`lightray.images.encode_image`): crosses the handle to the VaeDecoder,
    which encodes the images it decodes."""

    format: OutputFormat = "png"
    compression: int = DEFAULT_COMPRESSION
    """0-100, the encoder's quality for JPEG and WebP (100: least loss); PNG is lossless and ignores it."""

    def __post_init__(self) -> None:
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"format must be one of {OUTPUT_FORMATS}, got {self.format!r}")
        if not 0 <= self.compression <= 100:
            raise ValueError(f"compression must be in [0, 100], got {self.compression}")

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @property
    def lossless(self) -> bool:
        return self.format == "png"


PNG = OutputEncoding()
"""The default encoding, and the lossless one images are composed from (`lightray.edits.compose_images`)."""


class DenoiseCancelled(RuntimeError):
    """The request was cancelled (timeout, client gone); the engine dropped it at a step boundary."""


class EngineFull(RuntimeError):
    """The denoising engine already holds as many requests as it is configured for."""


class AdapterLoadError(RuntimeError):
    """A tenant adapter named by a request could not be loaded into the transformer (that request alone fails)."""


@dataclasses.dataclass(frozen=True)
class AdapterUse:
    """One tenant adapter applied to a request, with its strength."""

    ref: str
    """`tenant/name@vN` once the ingress has pinned it (a request's `latest` becomes a concrete version)."""
    scale: float = 1.0
    """Multiplier of the adapter's LoRA delta (peft's `set_adapters` weight)."""
    checksum: str = ""
    """The pinned version's manifest checksum (`AdapterManifest.checksum`), set by the ingress with `ref`: the
    Denoiser loads the adapter only if the registry's manifest for `ref` still has it. Empty: whatever `ref` names."""

    @property
    def key(self) -> str:
        """What caches of loaded adapters key on (the Denoiser's multiplexed model id, the engine's adapters): the
        content, not the ref alone (`tenant/name@vN#<checksum>`; the ref when no checksum is known)."""
        return f"{self.ref}#{self.checksum}" if self.checksum else self.ref

    @classmethod
    def from_key(cls, key: str, scale: float = 1.0) -> "AdapterUse":
        """The use `key` (`AdapterUse.key`) stands for."""
        ref, _, checksum = key.partition("#")
        return cls(ref=ref, scale=scale, checksum=checksum)


def denoising_steps(num_inference_steps: int, strength: float) -> int:
    """Steps a run of `strength` takes (the one rule: the engine trims its schedule by it, admission charges by
    it, previews are spread over it): the pipelines' `get_timesteps` keeps the last
    `steps - int(steps - steps * strength)` of the schedule, all of it at strength 1, at least 1 for any
    strength > 0."""
    init = min(num_inference_steps * strength, num_inference_steps)
    return num_inference_steps - int(max(num_inference_steps - init, 0))


@dataclasses.dataclass(frozen=True)
class DenoiseParams:
    """What one request asks of the denoiser: everything but the tensors."""

    seeds: tuple[int, ...]
    """One per image; `len(seeds)` is the number of images."""
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float = 1.0
    """> 1: true CFG with the negative embeddings (two rows per image in every forward)."""
    variant: str | None = None
    """Model id of the variant (its Lightning LoRA and scheduler); None: the preset's first."""
    adapters: tuple[AdapterUse, ...] = ()
    """Tenant adapters, applied in this order on top of the variant's Lightning LoRA."""
    strength: float = 1.0
    """Image inputs only: the fraction of the schedule run from the noised input image (diffusers' `strength`)."""
    priority: Priority = "interactive"
    tenant: str | None = None
    """Who asked (for fairness between tenants of one priority); None when auth is off."""
    preview_steps: tuple[int, ...] = ()
    """Steps (1-based) after which the engine reports the x0-prediction latents as a preview."""
    request_id: str | None = None
    """The ingress's request id (`GenerationSpec.request_id`), for the Denoiser's and the engine's log lines."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds: at least one seed is required")
        if self.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES}, got {self.priority!r}")
        if len(self.adapters) > MAX_STACKED_ADAPTERS:
            raise ValueError(f"at most {MAX_STACKED_ADAPTERS} adapters, got {len(self.adapters)}")

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def total_steps(self) -> int:
        """Steps this request runs: the last `strength` of its `num_inference_steps` (`denoising_steps`)."""
        return denoising_steps(self.num_inference_steps, self.strength)

    @property
    def uses_cfg(self) -> bool:
        return self.true_cfg_scale > 1


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
    """The text encoder's output for one request."""

    prompt: np.ndarray
    """[tokens, hidden] float32, the prompt's embeddings without padding."""
    negative: np.ndarray | None = None
    """The negative prompt's, when the request uses true CFG."""
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)
    handoff_at: float | None = None
    # The image slots come last: the deployments build this object positionally.
    prompt_image_slots: np.ndarray | None = None
    """[tokens] bool, True at the prompt's vision-encoder image slots (Qwen-Image-2.1's `image_pad_mask`: where the
    condition images' latents enter the transformer's sequence, one slot per 2×2 condition tokens); None: a family
    whose text carries no image slots."""
    negative_image_slots: np.ndarray | None = None
    """The negative prompt's image slots (Qwen-Image-2.1 with true CFG)."""


@dataclasses.dataclass(frozen=True)
class ImageLatents:
    """An input image as the denoiser's starting point for the n seeds of a request (img2img, inpainting)."""

    latents: np.ndarray
    """[n, tokens, 4·z] float32: normalised, packed latents, one per seed (the pipelines' `image_latents`)."""
    generator_states: tuple[np.ndarray, ...] | None = None
    """Per seed, its generator's state after the posterior draw (mode "sample"); None when nothing was drawn
    (mode "argmax": the denoiser's generators start fresh from the seeds)."""
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)
    handoff_at: float | None = None


@dataclasses.dataclass(frozen=True)
class ConditionLatents:
    """The input images of an instruction edit as condition tokens (family `qwen-image-edit-plus`): what the VAE
    stage encodes and the denoiser appends after every row's noise tokens."""

    latents: np.ndarray
    """[tokens, 4·z] float32: each image's normalised, packed latents (posterior mean), concatenated in image
    order (the pipeline's `image_latents` for one image of the batch)."""
    grids: tuple[tuple[int, int], ...]
    """(rows, columns) of each image's packed tokens, in order; their products sum to `latents`' tokens."""
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)
    handoff_at: float | None = None

    def __post_init__(self) -> None:
        if not self.grids or sum(r * c for r, c in self.grids) != self.latents.shape[0]:
            raise ValueError(f"condition: grids {self.grids} do not cover {self.latents.shape[0]} tokens")


@dataclasses.dataclass(frozen=True)
class DenoisedLatents:
    """The denoiser's output for one request."""

    latents: np.ndarray
    """[n, tokens, 64] float32 packed latents, in seed order."""
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)
    handoff_at: float | None = None


@dataclasses.dataclass(frozen=True)
class StepProgress:
    """Reported by the engine after each denoising step of a request."""

    step: int
    """Steps done (1-based)."""
    total_steps: int
    """Steps this request runs (fewer than `num_inference_steps` for an image input with strength < 1)."""
    preview: np.ndarray | None = None
    """[n, tokens, 64] float32 x0-prediction latents (x - sigma·v) after this step, for the steps named in
    `DenoiseParams.preview_steps`; None otherwise."""
    preview_images: tuple[bytes, ...] | None = None
    """That preview already made and encoded, one image per seed: the Denoiser makes fast previews itself when its
    model ships a preview decoder (`lightray.stages.preview.shipped_preview`), and then sends these instead of
    `preview`."""


@dataclasses.dataclass(frozen=True)
class DecodedImages:
    """The VAE decoder's output for one request: what the ingress returns."""

    pngs: tuple[bytes, ...]
    """Encoded image bytes, one per seed, in seed order: PNG unless `decode` was asked for another encoding (the
    name dates from when PNG was the only one)."""
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)

"""Typed configuration: model presets (what weights, how to sample them, what requests may ask for).

Presets are data: YAML files under `configs/models/`, loaded into these validated objects. A Serve config names a
preset by file (or inlines one) so the same model definition serves `serve run`, `serve deploy` and KubeRay.
"""

from __future__ import annotations

import json
import math
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_PRESETS_DIR = REPO_ROOT / "configs" / "models"
DEFAULT_PRESET = "lightray-shapes"

FLOW_MATCH_SCHEDULER_KEYS = frozenset({
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "time_shift_type", "stochastic_sampling",
})
"""Every argument of diffusers' `FlowMatchEulerDiscreteScheduler` (tests/test_real_model.py keeps this in step with
the installed diffusers): a variant's `scheduler` must give all of them. Kept here, not read from diffusers, so the
ingress validates presets without importing it."""

HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""What a Hugging Face repo id looks like ("Qwen/Qwen-Image")."""

WIDTH_X_HEIGHT = re.compile(r"(\d{1,5})x(\d{1,5})")
"""How a size is written ("192x128"): in the API's `size`, on command lines, in file keys."""


def parse_width_height(text: str) -> tuple[int, int]:
    """(width, height) of a "WIDTHxHEIGHT" string; ValueError saying what was expected. Whether the size is served
    is `ModelPreset.size_refusal`'s question."""
    m = WIDTH_X_HEIGHT.fullmatch(text)
    if m is None:
        raise ValueError(f'expected "WIDTHxHEIGHT" (e.g. "192x128"), got {text!r}')
    return int(m.group(1)), int(m.group(2))


class ModelNotFound(FileNotFoundError):
    """A preset's `path` is neither a local diffusers folder nor a repo id already in the local Hugging Face cache."""


def resolve_model_path(path: str) -> Path:
    """The local folder a preset's `path` names: an existing folder (absolute, `~`, or relative to the repository
    root), else a Hugging Face repo id resolved in the local HF cache (`HF_HUB_CACHE` / `HF_HOME`) with
    `local_files_only=True`. Nothing is ever downloaded: a replica that would need a download fails at start."""
    p = Path(path).expanduser()
    local = p if p.is_absolute() else REPO_ROOT / p
    if local.is_dir():
        return local
    if not p.is_absolute() and HF_REPO_ID.fullmatch(path):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            snapshot = Path(snapshot_download(path, local_files_only=True))
        except LocalEntryNotFoundError as err:
            raise ModelNotFound(
                f"model path {path!r}: no folder {local} and no snapshot of the repo {path!r} in the local Hugging "
                f"Face cache ({err}). Download it ahead of time (`hf download {path}`) or give a folder; "
                "Lightray never downloads at run time") from None
        if not (snapshot / "model_index.json").is_file():
            raise ModelNotFound(f"model path {path!r}: the cached snapshot {snapshot} has no model_index.json")
        return snapshot
    raise ModelNotFound(f"model path {path!r}: no folder {local} (and it is not a Hugging Face repo id)")


QualityTier = Literal["low", "medium", "high"]
"""OpenAI's `quality` values that pick a variant (`ModelPreset.quality_variants`); `auto` picks the default."""
QUALITY_TIERS: tuple[QualityTier, ...] = ("low", "medium", "high")


class VariantConfig(BaseModel):
    """One servable model id: the base weights sampled a particular way (e.g. base+CFG, or a Lightning LoRA)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """The `model` name clients send (OpenAI API `model` field)."""
    lightning_lora: str | None = None
    """Path to a distilled LoRA in the published Qwen-Image-Lightning format (`lora_down`/`lora_up`/`alpha`),
    applied under any tenant adapter. Relative paths resolve against the preset's `path`. None: the base model."""
    num_inference_steps: int = Field(30, ge=1, le=200)
    """Default number of denoising steps."""
    true_cfg_scale: float = Field(4.0, ge=1.0, le=20.0)
    """Default true-CFG scale; 1.0 disables CFG (one transformer pass per step, as distilled models expect)."""
    negative_prompt: str = " "
    """Negative prompt used when CFG is on and the client sends none (the pipeline needs one to enable CFG)."""
    scheduler: dict[str, Any] | None = None
    """This variant's complete `FlowMatchEulerDiscreteScheduler` config, used instead of the model folder's
    scheduler/scheduler_config.json (a Lightning LoRA is distilled on its own schedule: shift 3, exponential, no
    terminal shift). Every key of `FLOW_MATCH_SCHEDULER_KEYS` must be given: a partial config would inherit the
    folder's other keys (Qwen-Image's `shift_terminal: 0.02` did, and moved Lightning's last sigma). None: the
    folder's scheduler."""
    checkpoint_sigmas: bool = False
    """Sample the checkpoint's own sigma grid, `sample_sigmas` in its model_index.json (Qwen-Image-2.1 Turbo), as
    `QwenImage21TurboSetTimestepsStep` does, instead of linspace(1, 1/steps, steps); the grid's length is then the
    step count, and a request for another count is refused. The scheduler config's shift still applies."""

    @field_validator("scheduler")
    @classmethod
    def _scheduler_complete(cls, scheduler: dict[str, Any] | None) -> dict[str, Any] | None:
        if scheduler is None:
            return None
        keys = set(scheduler) - {"_class_name", "_diffusers_version"}
        missing, unknown = FLOW_MATCH_SCHEDULER_KEYS - keys, keys - FLOW_MATCH_SCHEDULER_KEYS
        if missing or unknown:
            raise ValueError(f"scheduler must be a complete FlowMatchEulerDiscreteScheduler config: missing "
                             f"{sorted(missing)}, unknown {sorted(unknown)}")
        return scheduler


class VaeDecodeConfig(BaseModel):
    """Memory bounds of the VAE decode (diffusers' `AutoencoderKLQwenImage` slicing and tiling).

    Its activation memory grows with images × pixels (docs/real_model.md has the numbers). Slicing changes no
    pixel of a lone image; tiling approximates (tiles are decoded separately and blended over their overlap), so
    it only starts above `tile_above_pixels`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    slice_images: bool = False
    """Decode a call's images one at a time (`enable_slicing`): the activations of one image, not of n. Each image
    is then decoded as a batch of one, as diffusers' pipelines decode n = 1."""
    tile_above_pixels: int | None = Field(None, ge=256)
    """Decode in overlapping spatial tiles (`enable_tiling`) when width × height exceeds this. None: never tile."""
    tile_size: int = Field(512, ge=64)
    """Tile side in pixels (a multiple of 16)."""
    tile_stride: int = Field(384, ge=32)
    """Pixels between tile starts; `tile_size - tile_stride` is the overlap the tiles are blended over."""

    @model_validator(mode="after")
    def _tiles_overlap(self) -> "VaeDecodeConfig":
        if self.tile_size % 16 or self.tile_stride % 16 or not self.tile_stride < self.tile_size:
            raise ValueError(f"tile_size and tile_stride must be multiples of 16 with tile_stride < tile_size, "
                             f"got {self.tile_size} and {self.tile_stride}")
        return self

    def tiles(self, height: int, width: int) -> bool:
        """Whether a decode at height × width is tiled."""
        return self.tile_above_pixels is not None and height * width > self.tile_above_pixels


class EditConfig(BaseModel):
    """How an instruction-edit model (family `qwen-image-edit-plus`) sizes its input images.

    `QwenImageEditPlusPipeline` keeps these as module constants (384² and 1024²); a preset carries them, so a
    scaled-down model can use its own. Each input image keeps its aspect ratio and is resized to the area, each
    side rounded to a multiple of 32."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    condition_image_area: int = Field(384 * 384, ge=32 * 32)
    """Pixels of each input image as the VL encoder reads it (the pipeline's `CONDITION_IMAGE_SIZE`)."""
    vae_image_area: int | None = Field(1024 * 1024, ge=32 * 32)
    """Pixels of each input image as the VAE encodes it into condition tokens (the pipeline's `VAE_IMAGE_SIZE`).
    None: every input image is encoded at the output's size (the embedded edit model, trained that way)."""


class ModelPreset(BaseModel):
    """A servable base model and its variants, with the limits the API enforces on requests."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Human name of the preset (not necessarily its file stem: configs/models/qwen-image-lightning.yaml is
    "qwen-image")."""
    base_model_id: str = Field(min_length=1)
    """Identity of the base weights adapters are trained against: recorded in every adapter's manifest at training
    time and required to match when one is requested (`lightray.registry.check_compatible`). Change it only with
    the weights: adapters published for the old value stop resolving."""
    adapter_base_model_ids: list[str] = Field(default_factory=list)
    """Other bases whose adapters this model also serves (`lightray.adapters.check_fits`), for weights distilled
    from them: Qwen-Image-2.1 Turbo takes adapters trained on the 2.1 base, as LoRAs of a base are used on its
    step-distilled model. Their fingerprint is not compared (the weights differ by design)."""
    path: str
    """diffusers-format folder (model_index.json, text_encoder/, tokenizer/, transformer/, vae/, scheduler/):
    a local folder (relative paths resolve against the repository root), or a Hugging Face repo id
    ("Qwen/Qwen-Image") already in the local HF cache. Never downloaded (`resolve_model_path`)."""
    family: str = "qwen-image"
    """The model family (`lightray.models.FAMILIES`): how requests are conditioned and what a transformer row holds.
    "qwen-image": text-to-image (edits are img2img / inpainting); "qwen-image-edit-plus": instruction editing with
    1-3 input images (Qwen-Image-Edit-2509 / 2511); "qwen-image-2.1": Qwen-Image-2.1 and its Turbo, generation and
    editing with 0-3 condition images in one model."""
    edit: EditConfig = Field(default_factory=EditConfig)
    """Input-image sizes of an instruction-edit family (ignored by the others)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of every component's parameters (each stage checks it after loading and refuses to start otherwise)."""
    device: str = "cpu"
    """torch device for the stages ("cpu", "cuda")."""
    prompt_template_encode_start_idx: int | None = None
    """Tokens the pipeline drops from the start of its chat template (34 for the real Qwen tokenizer). None:
    computed from the tokenizer, which is right for any tokenizer (the embedded model's included)."""
    max_sequence_length: int = Field(512, ge=1, le=1024)
    """Prompt tokens kept after the template prefix (the pipeline's `max_sequence_length`). Qwen-Image-2.1, whose
    encoder truncates nothing: the most tokens a prompt may have (a longer one is a 400 naming `prompt`)."""
    image_encode_mode: Literal["argmax", "sample"] = "argmax"
    """How input images (img2img, inpainting) become latents. "argmax": the VAE posterior's mean, as Qwen-Image's
    reference code and diffusers' QwenImageEdit pipelines do. "sample": a draw from the posterior with each
    image's generator, as diffusers' QwenImageImg2Img/Inpaint pipelines do. The embedded model's VAE is trained
    as a deterministic autoencoder (its variance head is untrained, std ≈ 1), so it needs "argmax"."""
    max_prompt_chars: int = Field(2000, ge=1)
    """Longest prompt accepted, in characters (checked at the API, before any tokenizer runs)."""
    default_size: tuple[int, int] = (128, 128)
    """(width, height) when the request gives no size."""
    sizes: list[tuple[int, int]] | None = None
    """The exact (width, height) sizes served, when the model draws only at the sizes it was trained at (the
    embedded model). None: every size within `min_side`, `max_side`, `max_pixels` and `max_aspect_ratio` (the real
    Qwen-Image, trained over a continuum of sizes). A request for any other size is refused (400, `size`)."""
    min_side: int = Field(16, ge=16)
    """Smallest width or height accepted when `sizes` is None."""
    max_side: int = Field(256, ge=16)
    """Largest width or height accepted when `sizes` is None (multiples of `size_multiple` only)."""
    max_pixels: int = Field(256 * 256, ge=256)
    """Largest width×height accepted when `sizes` is None."""
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    """Longest side over shortest side accepted when `sizes` is None (Qwen-Image's training ratios go to 3:1)."""
    size_multiple: int = 16
    """Width and height must be multiples of this (VAE 8× times the 2×2 patch packing)."""
    max_images_per_request: int = Field(10, ge=1, le=64)
    """Largest `n`."""
    max_inference_steps: int = Field(100, ge=1)
    default_preview: Literal["fast", "full"] = "fast"
    """How streamed previews (`partial_images`) are made when the request's `preview` field is not given. "fast": a
    latent-to-RGB projection fitted to this model's VAE at load, a quarter of the image's side, well under a
    millisecond each (`lightray.stages.preview`); "full": the VAE decodes each preview, at full size, as it decodes
    the final image (a full decode's cost per preview, and the VAE's own colours)."""
    vae_decode: VaeDecodeConfig = Field(default_factory=VaeDecodeConfig)
    """How the VAE decodes, to bound its activation memory (off for the embedded model: its decodes are tiny)."""
    vae_exact: bool = False
    """Run diffusers' causal 3D VAE (`AutoencoderKLQwenImage`) as it is, bit for bit. False (the default): the
    single-frame VAE (`lightray.stages.vae_single_frame`), the same weights folded into 2D convolutions, which
    equals diffusers' up to the order floating-point sums are taken (README, "Numerics") and runs several times
    faster on a CPU. Tests that compare pixels with diffusers' pipelines bit for bit set this."""
    variants: list[VariantConfig]
    """Model ids served from these weights; the first is the default."""
    fuse: str | None = None
    """A Lightning variant whose LoRA is merged into the base weights at load (`DenoiseEngine`, as peft's
    `merge_and_unload` does): the replica then serves that variant only, with no LoRA arithmetic left in its
    forward for the Lightning part (tenant adapters still stack on top, through the batched path). A request for
    another variant of this preset is refused (400 naming `model`) unless another served preset serves it. None:
    every variant, each Lightning LoRA applied per row (one deployment serves them all). README, "Fused Lightning
    replicas", says when to choose which."""
    quality_variants: dict[QualityTier, str] = Field(default_factory=dict)
    """The variant (model id) each of OpenAI's `quality` values selects when a request names no `model`, e.g.
    low → Lightning 4, medium → Lightning 8, high → the base with true CFG. A quality not listed here, and `auto`,
    select the default (first) variant. A request that names its `model` gets that model whatever its quality."""

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        from lightray.models import family_named

        family_named(family)
        return family

    @property
    def model_family(self):
        """The `lightray.models.ModelFamily` of `family`."""
        from lightray.models import family_named

        return family_named(self.family)

    @field_validator("variants")
    @classmethod
    def _unique_variant_ids(cls, variants: list[VariantConfig]) -> list[VariantConfig]:
        ids = [v.id for v in variants]
        if not variants or len(set(ids)) != len(ids):
            raise ValueError(f"variants must be non-empty with unique ids, got {ids}")
        return variants

    @model_validator(mode="after")
    def _quality_variants_exist(self) -> "ModelPreset":
        ids = [v.id for v in self.variants]
        unknown = {q: m for q, m in self.quality_variants.items() if m not in ids}
        if unknown:
            raise ValueError(f"quality_variants names variants this preset does not serve: {unknown}; "
                             f"variants: {ids}")
        return self

    @model_validator(mode="after")
    def _fuse_names_a_lightning_variant(self) -> "ModelPreset":
        if self.fuse is None:
            return self
        if self.fuse not in self.lightning_variant_ids:
            raise ValueError(f"fuse: {self.fuse!r} is not a Lightning variant of this preset; fuse names one of "
                             f"{self.lightning_variant_ids} (a variant with a `lightning_lora`), or is left out")
        return self

    @property
    def lightning_variant_ids(self) -> list[str]:
        """Ids of the variants that draw with a Lightning LoRA."""
        return [v.id for v in self.variants if v.lightning_lora]

    @property
    def served_variants(self) -> list[VariantConfig]:
        """The variants this preset's replicas serve: the fused one alone with `fuse`, else all of them."""
        return [v for v in self.variants if v.id == self.fuse] if self.fuse else list(self.variants)

    def variant_for_quality(self, quality: str | None) -> VariantConfig:
        """The variant a request without `model` gets for its `quality` (`quality_variants`; else the default). A
        fused preset serves its one variant whatever the quality."""
        mapped = self.quality_variants.get(quality)  # type: ignore[arg-type]
        return self.variant(mapped if mapped in self.model_ids else None)

    def qualities_of(self, model_id: str) -> list[str]:
        """The `quality` values that select `model_id` when a request names no model, in QUALITY_TIERS order and
        "auto" last (the default variant's)."""
        qualities = [q for q in QUALITY_TIERS if self.variant_for_quality(q).id == model_id]
        return qualities + ["auto"] if model_id == self.variants[0].id else qualities

    def quality_tier(self, model_id: str, asked: str | None = None) -> QualityTier | None:
        """The quality tier `model_id` serves (OpenAI's response `quality`): `asked` when `quality_variants` maps
        it to `model_id`, else the lowest tier mapped to it; None when no tier is (the preset says nothing)."""
        mapped = [q for q in QUALITY_TIERS if self.quality_variants.get(q) == model_id]
        return asked if asked in mapped else next(iter(mapped), None)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _sizes_consistent(self) -> "ModelPreset":
        for side in (*self.default_size, self.min_side, self.max_side, *(v for wh in self.sizes or () for v in wh)):
            if side % self.size_multiple:
                raise ValueError(f"sizes must be multiples of {self.size_multiple}, got {side}")
        if self.sizes is not None and (not self.sizes or len(set(self.sizes)) != len(self.sizes)):
            raise ValueError(f"sizes must be a non-empty list without repeats, got {self.sizes}")
        if (refusal := self.size_refusal(*self.default_size)) is not None:
            raise ValueError(f"default_size {self.default_size} is not served: {refusal}")
        return self

    def size_refusal(self, width: int, height: int) -> str | None:
        """Why width×height is not served (a sentence that says what is), or None when it is."""
        # A preset with a list answers with the list whatever was asked (every listed size is a multiple already).
        if self.sizes is not None:
            if (width, height) in self.sizes:
                return None
            return f"{width}x{height} is not served; this model draws at {', '.join(self.size_names)}"
        k = self.size_multiple
        if width % k or height % k:
            return f"width and height must be multiples of {k}, got {width}x{height}"
        lo, hi = self.min_side, self.max_side
        if not (lo <= width <= hi and lo <= height <= hi):
            return f"width and height must be between {lo} and {hi}, got {width}x{height}"
        if width * height > self.max_pixels:
            return f"at most {self.max_pixels} pixels, got {width}x{height}"
        if max(width, height) > self.max_aspect_ratio * min(width, height):
            return f"aspect ratio at most {self.max_aspect_ratio:g}:1, got {width}x{height}"
        return None

    @property
    def size_names(self) -> list[str]:
        """"WxH" of every served size when `sizes` is set, smallest first; otherwise a menu of common ones (the
        default, and sides that are multiples of 64 paired up to 2:1), all of which `size_refusal` accepts."""
        if self.sizes is not None:
            pairs = set(self.sizes)
        else:
            sides = {self.min_side, self.max_side, *self.default_size}
            sides |= {s for s in range(self.min_side, self.max_side + 1) if s % 64 == 0 and s % self.size_multiple == 0}
            pairs = {(w, h) for w in sides for h in sides
                     if max(w, h) <= 2 * min(w, h) and self.size_refusal(w, h) is None}
        return [f"{w}x{h}" for w, h in sorted(pairs, key=lambda p: (p[0] * p[1], -p[0]))]

    def nearest_size(self, width: int, height: int) -> tuple[int, int]:
        """The served size closest to width×height: the nearest aspect ratio first, then the nearest pixel count
        (both on a log scale). An edit's input of a size not served is resized to it."""
        if self.size_refusal(width, height) is None:
            return width, height
        if self.sizes is None:
            raise ValueError("nearest_size needs an exact `sizes` list")
        return min(self.sizes, key=lambda wh: (round(abs(math.log(wh[0] * height / (wh[1] * width))), 6),
                                               abs(math.log(wh[0] * wh[1] / (width * height)))))

    @property
    def largest_size(self) -> tuple[int, int]:
        """The served (width, height) with the most pixels."""
        if self.sizes is not None:
            return max(self.sizes, key=lambda wh: wh[0] * wh[1])
        k = self.size_multiple
        side = min(self.max_side, math.isqrt(self.max_pixels) // k * k)
        other = self.max_pixels // self.max_side // k * k
        return max([(side, side), (self.max_side, other)], key=lambda wh: wh[0] * wh[1])

    @cached_property
    def root(self) -> Path:
        """The local folder of `path` (`resolve_model_path`)."""
        return resolve_model_path(self.path)

    def resolve(self, relative: str) -> Path:
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.root / p

    @cached_property
    def vae_scale_factor(self) -> int:
        """Spatial compression of the VAE, read from its config: without a VAE loaded, QwenImagePipeline would
        assume 8, so the denoiser stage carries the real value."""
        cfg = json.loads((self.root / "vae" / "config.json").read_text())
        return 2 ** len(cfg.get("temperal_downsample", [False, True, True]))

    def variant(self, model_id: str | None) -> VariantConfig:
        """A served variant by model id (None: the default); KeyError for one not served (`unserved_refusal` says
        why, when the preset has it but fuses another)."""
        served = self.served_variants
        if model_id is None:
            return served[0]
        for v in served:
            if v.id == model_id:
                return v
        raise KeyError(model_id)

    @property
    def model_ids(self) -> list[str]:
        """The model ids this preset's replicas serve (`served_variants`)."""
        return [v.id for v in self.served_variants]

    def unserved_refusal(self, model_id: str) -> str | None:
        """Why a variant this preset defines is not served here (it fuses another), or None."""
        if self.fuse and model_id != self.fuse and any(v.id == model_id for v in self.variants):
            return (f"model {model_id!r} is not served by this deployment of {self.name}: its replicas have "
                    f"{self.fuse!r}'s Lightning LoRA fused into their weights and serve {self.fuse!r} only")
        return None


class EngineConfig(BaseModel):
    """How much work one engine step may take, and how it waits for work.

    Set per deployment from the Serve YAML (`Denoiser` args `engine:`); the defaults suit the embedded model on
    a CPU replica (docs/engine.md has the step-time curve they come from).
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_batch_rows: int = Field(16, ge=1, le=512)
    """Most transformer rows in one step, over all latent grids. An image is one row, two with true CFG. A request
    larger than the budget still runs, alone (it is never split across steps)."""
    max_batch_tokens: int | None = Field(None, ge=1)
    """Optional second bound: rows × image tokens per step (image tokens = (height/16)·(width/16), plus an
    instruction edit's condition tokens; a prefix-cache family's row counts its prefix only at its first step,
    which computes it). None: rows alone bound the step."""
    starvation_steps: int = Field(200, ge=1)
    """A request that has waited this many engine steps without running goes ahead of shorter work of its priority
    (least-remaining-work-first would otherwise let a stream of short requests pause a long one for ever)."""
    fair_share_decay: float = Field(0.9, ge=0, lt=1)
    """How long the scheduler remembers the rows each tenant ran when it shares a step between tenants
    (`lightray/engine/scheduler.py`, point 3): a step's rows count this much less at each later step (0.9: about
    the last ten steps; 0: only the rows chosen for this step)."""
    max_live_requests: int = Field(64, ge=1)
    """Requests the engine holds at once, running, paused or waiting; `submit` refuses more (the deployment's
    `max_ongoing_requests` should not exceed it)."""
    max_prefix_cache_bytes: int | None = Field(None, ge=1)
    """Most bytes the prefix KV caches of the requests the engine holds may take together (a prefix-cache family,
    Qwen-Image-2.1: each request keeps its prompt's and condition images' keys and values for every layer, from
    its first step to its last, paused ones too); `submit` refuses a request whose cache would pass it
    (`EngineFull`). Counted from each request's size before its first step. None: only `max_live_requests`
    bounds them."""
    compile: bool = False
    """Compile the transformer's repeated block (`QwenImageTransformerBlock`) with `torch.compile`, regionally as
    diffusers' `compile_repeated_blocks` does, with dynamic shapes so that a new row count or sequence length does
    not recompile. The replica compiles at start (`compile_warmup_rows`), inside its readiness time, never on a
    user's request; a torch whose compiler backend does not work fails the replica at start, saying so."""
    compile_backend: str = "inductor"
    """`torch.compile`'s backend when `compile` is on."""
    compile_warmup_rows: list[int] = Field(default_factory=lambda: [1, 2, 4])
    """Row counts the replica runs a two-step warm-up batch of at start, at the preset's default size, when
    `compile` is on: a count of 1 is its own graph (torch specialises sizes 0 and 1), every count from 2 up shares
    one dynamic graph (the others check that it does)."""
    idle_wait_s: float = Field(0.5, gt=0)
    """How long the loop sleeps when it has nothing to run before checking again (it wakes at once on a new
    request)."""
    health_check_timeout_s: float = Field(20.0, gt=0)
    """How long `check_health` waits for its probe, which the loop runs at the next step boundary: it must exceed
    the longest step (a full 8-row step at 1536x1536 on the real model: estimated at seconds, not measured), and
    stay below the deployment's `health_check_timeout_s` (Serve's default 30 s) so the check reports its own
    reason."""


def load_preset(ref: str | dict | ModelPreset = DEFAULT_PRESET) -> ModelPreset:
    """A preset from a name under configs/models/, a YAML path, an inline dict, or an existing object. An inline
    dict with `from_preset: <name or path>` is that preset with the dict's other keys replacing its own (a Serve
    YAML's fused deployment: `{from_preset: qwen-image-lightning, name: qwen-image-fused-4, fuse: ...}`)."""
    if isinstance(ref, ModelPreset):
        return ref
    if isinstance(ref, dict):
        if "from_preset" in ref:
            overrides = {k: v for k, v in ref.items() if k != "from_preset"}
            return ModelPreset.model_validate({**load_preset(ref["from_preset"]).model_dump(), **overrides})
        return ModelPreset.model_validate(ref)
    # A name may hold dots ("qwen-image-2.1-turbo"): it is a name when configs/models/ has it.
    path = MODEL_PRESETS_DIR / f"{ref}.yaml"
    if not path.exists():
        path = Path(ref)
        if not path.is_absolute() and not path.exists():
            path = REPO_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"no model preset {ref!r} (looked for {path})")
    return ModelPreset.model_validate(yaml.safe_load(path.read_text()))

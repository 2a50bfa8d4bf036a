"""`TrainConfig`: one LoRA training run, as written in `configs/train/<x>.yaml`, every field documented."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lightray.models.qwen_image import QWEN_IMAGE
from lightray.registry import validate_name, validate_tenant

LARGE_TRANSFORMER_PARAMETERS = 1_000_000_000
"""From this size on a transformer trains with gradient checkpointing unless the config says otherwise: the real
Qwen-Image (20.4B) is far above, the embedded model (a few million) far below."""


@dataclasses.dataclass(frozen=True)
class DatasetLimits:
    """How large a data set may be (`TrainConfig`'s `max_dataset_records`, `max_file_bytes`,
    `max_dataset_bytes`, whose names the errors use), checked before the bytes are read or downloaded."""

    max_records: int = 10_000
    max_file_bytes: int = 32 * 1024 * 1024
    max_total_bytes: int = 2 * 1024**3


def parse_ratio(text: str) -> float:
    """"16:9" → 16/9 (width over height)."""
    w, sep, h = text.partition(":")
    try:
        value = float(w) / float(h) if sep else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"aspect ratio {text!r} is not W:H (e.g. 4:3)") from None
    if not value > 0:
        raise ValueError(f"aspect ratio {text!r} is not positive")
    return value


class TrainConfig(BaseModel):
    """One LoRA training run, as written in `configs/train/<x>.yaml`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tenant: str
    """Registry tenant the adapter is published under ([a-z0-9_.-], 1-63 chars)."""
    name: str
    """Adapter name within the tenant; each successful run publishes the next version of tenant/name."""
    dataset: str
    """Imagefolder data set: images plus `metadata.jsonl` lines `{"file_name": ..., "text": ...}`. A local folder
    or an fsspec URL (`s3://bucket/datasets/acme/ring`), downloaded before validation. Relative paths resolve
    against the current directory (in a `ray job submit --working-dir .` job: the uploaded copy, which leaves out
    gitignored folders such as data/, so pass an absolute path there)."""
    dataset_storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec options for a remote `dataset` (for S3 prefer the AWS_* environment variables for secrets)."""
    registry: str = "./registry"
    """Adapter registry root the result is published to: folder or `s3://bucket/prefix`."""
    registry_storage_options: dict[str, Any] | None = None
    """fsspec options for the registry; None: `$LIGHTRAY_REGISTRY_STORAGE_OPTIONS` (JSON) or the AWS_*
    environment. Never recorded in the manifest."""
    preset: str | dict[str, Any] = "lightray-shapes"
    """Base model preset: a name under configs/models/, a YAML path, or an inline preset."""
    trigger_words: list[str] = Field(default_factory=list)
    """Words the captions use to invoke the concept; recorded in the manifest so clients know what to write."""
    visibility: Literal["private", "public"] = "private"
    """Who may use the published adapter: only `tenant` (private), or every tenant of the service (public)."""

    rank: int = Field(16, ge=1, le=256)
    """LoRA rank r."""
    alpha: float | None = Field(None, gt=0)
    """LoRA alpha (the update is scaled by alpha / rank); None: equal to `rank`."""
    target_modules: list[str] = Field(default_factory=lambda: list(QWEN_IMAGE.lora_targets))
    """Transformer sub-modules that get LoRA matrices (peft `target_modules` suffixes)."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch during training."""

    steps: int = Field(500, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(4, ge=1)
    """Global batch size per step, split evenly across workers (must be a multiple of `num_workers`). The defaults of
    this and `learning_rate` are diffusers' DreamBooth LoRA ones; the toy configs set their own."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak AdamW learning rate (linear warm-up, flat, cosine decay over the last 30 %)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on the LoRA matrices."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches summed into each optimizer step: a worker runs `batch_size / (num_workers x this)` images
    per forward, so a large global batch fits a GPU's activations. DDP all-reduces only on the last one."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """"adamw": torch's AdamW, float32 state (8 bytes per LoRA parameter). "adamw_8bit": bitsandbytes'
    AdamW8bit (2 bytes per parameter; needs `bitsandbytes` installed, and a CUDA device)."""
    train_with_lightning: str | None = None
    """A Lightning variant id of the preset (e.g. "lightray-shapes-lightning-4") whose distilled LoRA is active,
    frozen at scale 1, while the adapter trains: the adapter then learns on top of the model that variant serves.
    The published adapter holds only the new LoRA. None: trained against the base (and served on every variant).
    Measured on the embedded model (docs/adapters.md): better on the Lightning variants, worse on the base."""
    gradient_checkpointing: bool | None = None
    """Recompute each transformer block's activations in the backward pass instead of keeping them (activation
    memory of one block instead of all, for about a third more compute). None: on for a transformer of at least
    `LARGE_TRANSFORMER_PARAMETERS` parameters (the real 20B model), off for the embedded one (whose activations
    are small and whose CPU steps it would slow)."""
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Probability of training a sample with an empty caption ("" or " ", the default negative prompt): the LoRA
    also shifts the unconditional branch that true CFG subtracts, and this keeps that branch trained."""
    timestep_shift: float = Field(3.0, gt=0)
    """Shift applied to the logit-normal training times (the sampler's schedule shift)."""
    resolution: int | None = Field(None, ge=16)
    """Square training side in pixels for the square mode (no `buckets`, no `max_pixels`): every image is
    centre-cropped and resized to it, upscaled if smaller. None: the preset's `default_size` (which must then be
    square)."""
    buckets: list[tuple[int, int]] | None = None
    """Aspect-ratio buckets, (width, height) each, every one a size the preset serves: each image trains at the
    bucket of its nearest aspect ratio (the largest it covers), a batch comes from one bucket. Images smaller than
    every bucket of their ratio are refused (or skipped, `skip_bad_images`)."""
    max_pixels: int | None = Field(None, ge=256)
    """Pixel budget the buckets are derived from when `buckets` is not given (as diffusers' and DiffSynth's
    `max_pixels`): for a preset with an exact size list, the largest served size of each of its aspect ratios
    within the budget; otherwise one size per `aspect_ratios` entry, as large as the budget allows."""
    aspect_ratios: list[str] = Field(default_factory=lambda: ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16"])
    """W:H ratios of the buckets derived from `max_pixels` for a preset that serves a continuum of sizes (Qwen-Image's
    recommended ones)."""
    skip_bad_images: bool = False
    """Train on the usable records of a data set that has bad ones (unreadable images, missing captions, images
    smaller than their buckets) instead of refusing it; the log and the manifest's notes say how many were
    skipped, and why."""
    max_dataset_records: int = Field(10_000, ge=1)
    """Most records (non-empty metadata.jsonl lines) a data set may have; more refuse it before any image is read
    or downloaded."""
    max_file_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    """Largest file of a data set, in bytes (each image, and metadata.jsonl): checked by a stat (or the store's
    listing) before the file is read or downloaded, and the read stops past it. A larger image is a bad record
    (`skip_bad_images` skips it); a larger metadata.jsonl refuses the data set."""
    max_dataset_bytes: int = Field(2 * 1024**3, ge=1024)
    """Most bytes of image files a data set may hold in all. The driver keeps the files (not their pixels) and
    sends them to the workers, which decode their own shards, so this bounds the driver's memory and the object
    store's; past it the data set is refused before the rest is read or downloaded."""
    input_cache: str | None = None
    """Where the caching pass writes the encoded latents and caption embeddings (folder or fsspec URL), so a
    restarted run reuses them; None: `<storage_path>/input-cache` when `storage_path` is set, else nothing is kept
    (each start encodes again)."""
    cache_vae_batch_size: int = Field(8, ge=1)
    """Images per VAE encode call in the caching pass (the memory plan checks it fits at the largest bucket)."""
    cache_text_batch_size: int = Field(16, ge=1)
    """Captions per text-encoder forward in the caching pass (captions of one token length share a forward)."""
    seed: int = 0
    """Seeds LoRA initialisation (identical on every worker), sampling of batches, noise and times."""

    log_every: int = Field(10, ge=1)
    """Report loss/progress every this many steps."""
    checkpoint_every: int = Field(100, ge=1)
    """Save a resumable checkpoint every this many steps (and always after the last step)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept in `storage_path` (the newest ones)."""

    num_workers: int = Field(1, ge=1)
    """Data-parallel Ray Train workers; each trains on its own shard of the data set."""
    use_gpu: bool = False
    """One GPU per worker (gradients all-reduced with NCCL instead of gloo)."""
    gpu: str | None = None
    """GPU-class file the workers run on (configs/capacity/<class>.yaml, its `gpu:` section: memory, node label,
    per-process reserve). The memory plan must fit it: the job refuses a config whose plan does not before any Ray
    work (`lightray train estimate CONFIG` prints the plan). None: not checked (CPU training)."""
    model_configs: str | None = None
    """Folder with the transformer/, text_encoder/ and vae/ config.json files the memory plan is computed from
    (configs/qwen-image for the real model, so the plan needs no weights); None: the preset's own model folder."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPU resource each worker reserves."""
    torch_threads: int = Field(0, ge=0)
    """torch intra-op threads per worker; 0: torch's default (Ray sets it from the worker's CPUs)."""
    storage_path: str | None = None
    """Where Ray Train keeps run state and checkpoints (folder or s3:// URL shared by all nodes); None: Ray's
    default (~/ray_results)."""
    max_failures: int = Field(0, ge=0)
    """Times Ray Train restarts the workers after a failure, resuming from the latest checkpoint."""
    fail_at_step: int | None = Field(None, ge=0)
    """Testing only: raise before this step in a run that has not resumed from a checkpoint (a simulated crash;
    nothing is published)."""

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        return validate_tenant(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v)

    @field_validator("aspect_ratios")
    @classmethod
    def _ratios(cls, v: list[str]) -> list[str]:
        for text in v:
            parse_ratio(text)
        return v

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("target_modules must name at least one module")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of num_workers {self.num_workers}")
        per_step = self.num_workers * self.gradient_accumulation_steps
        if self.batch_size % per_step:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of num_workers x "
                             f"gradient_accumulation_steps = {per_step}")
        if self.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("optimizer adamw_8bit needs bitsandbytes, which is not installed "
                             "(pip install bitsandbytes), or use optimizer: adamw")
        return self

    @property
    def micro_batch(self) -> int:
        """Images one worker runs per forward."""
        return self.batch_size // (self.num_workers * self.gradient_accumulation_steps)

    def dataset_limits(self) -> DatasetLimits:
        """The data-set bounds above, for `load_imagefolder` and `fetch_dataset`."""
        return DatasetLimits(self.max_dataset_records, self.max_file_bytes, self.max_dataset_bytes)

    def checkpointing_for(self, transformer_parameters: int) -> bool:
        """Whether a transformer of that many parameters trains with gradient checkpointing (see the field)."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return transformer_parameters >= LARGE_TRANSFORMER_PARAMETERS

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def recorded(self) -> dict[str, Any]:
        """The config as the manifest records it: everything but storage options (they may hold secrets)."""
        return self.model_dump(mode="json", exclude={"registry_storage_options", "dataset_storage_options"})


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A `TrainConfig` from a YAML file, with `overrides` (already-parsed values) replacing its keys."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no training config {path}")
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        data.update(loaded)
    data.update(overrides or {})
    return TrainConfig.model_validate(data)

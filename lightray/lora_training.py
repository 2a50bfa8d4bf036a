"""LoRA training for tenant adapters: typed config, imagefolder validation, the flow-matching trainer, adapter
files in the format serving loads, and the manifest fields the registry records. No Ray import: the Ray Train
entrypoint (`jobs/train_lora.py`) wraps this, and everything here also runs (and is tested) in one process.

The objective is the base model's own (`lightray.world.train`): rectified flow, shifted logit-normal times,
VAE latents normalised the way the pipeline decodes them, captions through the frozen text encoder. Only LoRA
matrices on `LORA_TARGETS` of the transformer train.

Adapter folder written by `LoraTrainer.save_adapter` (what the registry publishes)::

    adapter_model.safetensors   diffusers LoRA keys ("transformer.<module>.lora_A.weight"), with the peft
                                LoraConfig in the safetensors metadata (so rank/alpha round-trip exactly)
    adapter_config.json         that LoraConfig as peft writes it (base_model_name_or_path = the preset's id)

`QwenImagePipeline.load_lora_weights(folder)` (hence the denoising engine's adapter loading) reads the folder as is: it
picks the folder's only ``.safetensors`` file. A folder from `save_pretrained` of a peft model
(``base_model.model.*`` keys) is *not* what serving loads, which is why the trainer does not write one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lightray.config import ModelPreset, load_preset
from lightray.fingerprint import fingerprint_model
from lightray.registry import validate_name, validate_tenant
from lightray.world.train import (
    LORA_TARGETS,
    TextCache,
    images_to_tensor,
    normalised_latents,
    pack,
    predict,
    shift_sigmas,
    warmup_cosine,
)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DatasetError", "ImageCaptionDataset", "InjectedFailure", "LoraTrainer",
    "TrainConfig", "dataset_hash", "fingerprint_model", "load_imagefolder", "load_train_config",
    "manifest_fields", "run_training",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINING_STATE = "training_state.pt"
METADATA_FILENAME = "metadata.jsonl"
IMAGE_SIZE_LIMIT = 4096  # longest side accepted in a data set (decompression bombs are refused by PIL anyway)
_MAX_REPORTED_PROBLEMS = 20


# ------------------------------------------------------------------------------------------------- config


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
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))
    """Transformer sub-modules that get LoRA matrices (peft `target_modules` suffixes)."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch during training."""

    steps: int = Field(500, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(16, ge=1)
    """Global batch size per step, split evenly across workers (must be a multiple of `num_workers`)."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak AdamW learning rate (linear warm-up, flat, cosine decay over the last 30 %)."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on the LoRA matrices."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping (global L2 norm)."""
    caption_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Probability of training a sample with an empty caption ("" or " ", the default negative prompt): the LoRA
    also shifts the unconditional branch that true CFG subtracts, and this keeps that branch trained."""
    timestep_shift: float = Field(3.0, gt=0)
    """Shift applied to the logit-normal training times (the sampler's schedule shift)."""
    resolution: int | None = Field(None, ge=16)
    """Square training side in pixels (images are centre-cropped and resized to it); None: the preset's
    `default_size` (which must then be square)."""
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
        return self

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


def resolve_training_size(config: TrainConfig, preset: ModelPreset) -> int:
    if config.resolution is not None:
        side = config.resolution
    else:
        w, h = preset.default_size
        if w != h:
            raise ValueError(f"preset default_size {w}x{h} is not square: set `resolution` in the training config")
        side = w
    if side % preset.size_multiple:
        raise ValueError(f"resolution {side} is not a multiple of the preset's size_multiple {preset.size_multiple}")
    return side


# ------------------------------------------------------------------------------------------------ dataset


class DatasetError(ValueError):
    """The data set cannot be trained on; `problems` lists every reason found (one line each)."""

    def __init__(self, folder: str | Path, problems: Sequence[str]):
        self.folder = str(folder)
        self.problems = list(problems)
        shown = self.problems[:_MAX_REPORTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        lines = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"invalid dataset {self.folder}:\n{lines}")


@dataclasses.dataclass
class ImageCaptionDataset:
    """A validated data set, ready to train on: every image RGB at the training size."""

    images: np.ndarray
    """uint8 [N, side, side, 3]."""
    captions: list[str]
    files: list[str]
    hash: str
    """`dataset_hash` of the source folder."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What was normalised on load (mode conversions, resizes), for the log."""

    def __len__(self) -> int:
        return len(self.captions)

    def shard(self, rank: int, world_size: int) -> "ImageCaptionDataset":
        """Every `world_size`-th example starting at `rank` (disjoint shards covering the data set)."""
        idx = list(range(rank, len(self), world_size))
        return dataclasses.replace(
            self, images=self.images[idx], captions=[self.captions[i] for i in idx],
            files=[self.files[i] for i in idx],
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, honouring EXIF orientation; transparency is composited over white (not dropped to black)."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _fit(image: Image.Image, side: int) -> Image.Image:
    """Centre-crop to a square and resize to `side`×`side` (no-op for an image that already is)."""
    if image.size == (side, side):
        return image
    return ImageOps.fit(image, (side, side), method=Image.Resampling.LANCZOS)


def dataset_hash(metadata: bytes, files: Sequence[tuple[str, bytes]]) -> str:
    """"sha256:<hex>" over metadata.jsonl's bytes, then each referenced file's name and bytes in metadata order:
    the same folder always hashes the same, and any change to a caption or a pixel changes it."""
    h = hashlib.sha256()
    h.update(b"metadata.jsonl\0")
    h.update(hashlib.sha256(metadata).digest())
    for name, data in files:
        h.update(name.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(data).digest())
    return "sha256:" + h.hexdigest()


def load_imagefolder(folder: str | Path, side: int) -> ImageCaptionDataset:
    """Validate and load an imagefolder data set (images + `metadata.jsonl`), resized to `side`.

    Raises `DatasetError` listing every problem: missing or empty folder, missing metadata.jsonl, lines that are
    not JSON objects, lines without `file_name` or with an empty `text`, files that do not exist or lie outside
    the folder, images PIL cannot decode. Images of any mode are converted to RGB (alpha over white), any size
    is centre-cropped and resized to `side`.
    """
    root = Path(folder)
    if not root.exists():
        raise DatasetError(root, [f"dataset folder {root} does not exist"])
    if not root.is_dir():
        raise DatasetError(root, [f"{root} is not a folder"])
    if not any(root.iterdir()):
        raise DatasetError(root, [f"dataset folder {root} is empty"])
    meta_path = root / METADATA_FILENAME
    if not meta_path.is_file():
        raise DatasetError(root, [
            f"{root} has no {METADATA_FILENAME} (the imagefolder layout: images plus one JSON line "
            '{"file_name": ..., "text": ...} per image)'
        ])
    raw = meta_path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(root, [f"{METADATA_FILENAME} is not UTF-8 ({err})"]) from None

    real_root = root.resolve()
    problems: list[str] = []
    images: list[np.ndarray] = []
    captions: list[str] = []
    files: list[str] = []
    hashed: list[tuple[str, bytes]] = []
    converted = resized = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{METADATA_FILENAME} line {lineno}"
        try:
            record = json.loads(line)
        except ValueError as err:
            problems.append(f"{where}: not valid JSON ({err})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        file_name, caption = record.get("file_name"), record.get("text")
        bad = False
        if not isinstance(file_name, str) or not file_name.strip():
            problems.append(f'{where}: missing "file_name"')
            bad = True
        if "text" not in record:
            problems.append(f'{where}: missing "text"')
            bad = True
        elif not isinstance(caption, str) or not caption.strip():
            problems.append(f'{where}: "text" is empty' if isinstance(caption, str) or caption is None
                            else f'{where}: "text" must be a string, got {type(caption).__name__}')
            bad = True
        if bad:
            continue
        rel = Path(file_name)
        path = (root / rel).resolve()
        if rel.is_absolute() or "\\" in file_name or not path.is_relative_to(real_root):
            problems.append(f"{where}: file_name {file_name!r} escapes the dataset folder")
            continue
        if not path.is_file():
            problems.append(f"{where}: file {file_name!r} does not exist")
            continue
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                if max(im.size) > IMAGE_SIZE_LIMIT:
                    problems.append(f"{where}: image {file_name!r} is {im.size[0]}x{im.size[1]}, larger than "
                                    f"{IMAGE_SIZE_LIMIT} px on a side")
                    continue
                im.load()
                mode, size = im.mode, im.size
                rgb = _to_rgb(im)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            problems.append(f"{where}: cannot read image {file_name!r} ({type(err).__name__}: {err})")
            continue
        converted += mode != "RGB"
        resized += size != (side, side)
        images.append(np.asarray(_fit(rgb, side), dtype=np.uint8))
        captions.append(caption.strip())
        files.append(file_name)
        hashed.append((file_name, data))
    if not problems and not captions:
        problems.append(f"{METADATA_FILENAME} has no records")
    if problems:
        raise DatasetError(root, problems)
    notes = []
    if converted:
        notes.append(f"{converted} image(s) converted to RGB")
    if resized:
        notes.append(f"{resized} image(s) centre-cropped/resized to {side}x{side}")
    return ImageCaptionDataset(np.stack(images), captions, files, dataset_hash(raw, hashed), notes)


def fetch_dataset(url: str, storage_options: dict[str, Any] | None, dest: Path) -> Path:
    """A local folder holding the data set at `url`: the folder itself when local, else a download into
    `dest` (metadata.jsonl first, then the files it names, each checked not to escape the prefix)."""
    import fsspec
    from fsspec.utils import get_protocol

    if get_protocol(url) in ("file", "local"):
        return Path(url.removeprefix("file://"))
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.exists(root):
        raise DatasetError(url, [f"dataset {url} does not exist"])
    dest.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(f"{root}/{METADATA_FILENAME}", str(dest / METADATA_FILENAME))
    except FileNotFoundError:
        raise DatasetError(url, [f"{url} has no {METADATA_FILENAME}"]) from None
    for line in (dest / METADATA_FILENAME).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            name = json.loads(line).get("file_name")
        except (ValueError, AttributeError):
            continue  # reported by load_imagefolder
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get_file(f"{root}/{name}", str(target))
        except FileNotFoundError:
            continue  # reported as missing by load_imagefolder
    return dest


# ------------------------------------------------------------------------------------------------ trainer


class InjectedFailure(RuntimeError):
    """The crash `TrainConfig.fail_at_step` asks for."""


class LoraTrainer:
    """LoRA on the preset's transformer, trained on (one worker's shard of) a data set.

    Distributed use: construct on every rank with the same config (LoRA init is seeded, so every rank starts
    from identical weights), then `wrap(fn)` the model with a data-parallel wrapper (DDP) before training. The
    per-rank batch is `batch_size // world_size`.
    """

    def __init__(self, config: TrainConfig, preset: ModelPreset, data: ImageCaptionDataset, *, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", log: Callable[[str], None] = print):
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from peft import LoraConfig

        self.config, self.preset, self.rank, self.world_size = config, preset, rank, world_size
        self.device = torch.device(device)
        self.log = log if rank == 0 else (lambda msg: None)
        self.side = resolve_training_size(config, preset)
        if len(data) < world_size:
            raise ValueError(f"the data set has {len(data)} images, fewer than the {world_size} workers")
        if data.images.shape[1:3] != (self.side, self.side):
            raise ValueError(f"data set images are {data.images.shape[1:3]}, the trainer expects {self.side}")
        shard = data.shard(rank, world_size)
        self.captions = shard.captions
        self.batch = config.batch_size // world_size
        self.grid = self.side // preset.size_multiple

        t0 = time.time()
        vae = AutoencoderKLQwenImage.from_pretrained(preset.root / "vae", torch_dtype=torch.float32).eval()
        self.latents = pack(normalised_latents(vae, images_to_tensor(shard.images))).to(self.device)
        del vae
        self.text = TextCache(preset.root, sorted(set(self.captions) | {"", " "}))
        self.log(f"encoded {len(self.captions)} images and {len(self.text.index)} captions per worker "
                 f"({time.time() - t0:.1f}s)")

        torch.manual_seed(config.seed)  # identical LoRA initialisation on every rank
        self.transformer = QwenImageTransformer2DModel.from_pretrained(
            preset.root / "transformer", torch_dtype=torch.float32).to(self.device)
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(
            r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.target_modules),
            lora_dropout=config.lora_dropout, init_lora_weights=True,
        ))
        self.lora_config = self.transformer.peft_config["default"]
        self.lora_config.base_model_name_or_path = preset.base_model_id
        self.params = []
        for n, p in self.transformer.named_parameters():
            p.requires_grad_("lora_" in n)
            if "lora_" in n:
                self.params.append(p)
        if not self.params:
            raise ValueError(f"target_modules {config.target_modules} matched no module of the transformer")
        self._freeze_unused()
        self.transformer.train()
        self.model: torch.nn.Module = self.transformer
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, config.steps, warmup=config.warmup_steps)
        self.rng = random.Random(config.seed * 1_000_003 + rank)
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank)
        self.step = 0
        self.resumed_from: int | None = None
        self.first_loss: float | None = None
        """Mean loss of the first reporting window of the run (kept across resumes)."""

    def _freeze_unused(self) -> None:
        """Freeze LoRA matrices the loss does not depend on (the last block's text-stream layers: the model only
        reads the image stream after it). They would stay at their initialisation anyway; frozen, DDP can run
        without `find_unused_parameters` (which it otherwise needs, or it fails on the second step)."""
        embeds, mask = self.text.batch(self.captions[:1])
        v = predict(self.transformer, self.latents[:1], torch.tensor([0.5], device=self.device),
                    embeds.to(self.device), mask.to(self.device), self.grid)
        v.float().pow(2).mean().backward()
        used = []
        for p in self.params:
            if p.grad is None:
                p.requires_grad_(False)
            else:
                used.append(p)
            p.grad = None
        if len(used) < len(self.params):
            self.log(f"{len(self.params) - len(used)} of {len(self.params)} LoRA tensors do not affect the "
                     "output (last block's text stream) and stay frozen")
        self.params = used

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def wrap(self, wrapper: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Replace the module the forward pass calls (e.g. with DDP); weights stay those of `self.transformer`."""
        self.model = wrapper(self.transformer)

    def train_step(self) -> float:
        """One optimizer step on a batch sampled from this rank's shard; returns this rank's loss."""
        cfg = self.config
        idx = [self.rng.randrange(len(self.captions)) for _ in range(self.batch)]
        # Dropped captions become "" or " " (the pipeline's default negative prompt), as in the base's training.
        caps = [self.rng.choice(("", " ")) if cfg.caption_dropout and self.rng.random() < cfg.caption_dropout
                else self.captions[i] for i in idx]
        embeds, mask = self.text.batch(caps)
        x0 = self.latents[idx]
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        sigma = shift_sigmas(torch.sigmoid(torch.randn(self.batch, generator=self.generator)), cfg.timestep_shift)
        sigma = sigma.to(self.device)
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        v = predict(self.model, xt, sigma, embeds.to(self.device), mask.to(self.device), self.grid)
        loss = F.mse_loss(v, noise - x0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach())

    def mean_across_ranks(self, value: float) -> float:
        """`value` averaged over the ranks (a collective: every rank must call it at the same point)."""
        dist = torch.distributed
        if self.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    # ----------------------------------------------------------------------------------- files

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().to("cpu", torch.float32).contiguous()
                for k, v in get_peft_model_state_dict(self.transformer, save_embedding_layers=False).items()}

    def save_adapter(self, folder: str | Path) -> Path:
        """Write `adapter_model.safetensors` + `adapter_config.json` (see the module docstring) into `folder`."""
        from diffusers import QwenImagePipeline

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        QwenImagePipeline.save_lora_weights(
            folder, transformer_lora_layers=self.lora_state_dict(), weight_name=ADAPTER_WEIGHTS,
            transformer_lora_adapter_metadata=self.lora_config.to_dict(),
        )
        self.lora_config.save_pretrained(str(folder))
        return folder

    def save_checkpoint(self, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """The adapter plus optimizer/scheduler/RNG state: `load_checkpoint` continues exactly here."""
        folder = self.save_adapter(folder)
        torch.save({
            "step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": self.rng.getstate(), "generator": self.generator.get_state(), "world_size": self.world_size,
            "first_loss": self.first_loss,
        }, folder / TRAINING_STATE)
        (folder / "trainer_state.json").write_text(json.dumps({"step": self.step, **(metrics or {})}, indent=2))
        return folder

    def load_checkpoint(self, folder: str | Path) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        weights = {k.removeprefix("transformer."): v for k, v in load_file(folder / ADAPTER_WEIGHTS).items()}
        result = set_peft_model_state_dict(self.transformer, weights, adapter_name="default")
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"checkpoint {folder} lacks {len(missing)} LoRA weights (e.g. {missing[0]})")
        state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("world_size") == self.world_size:
            self.rng.setstate(state["rng"])
            self.generator.set_state(state["generator"])
        self.first_loss = state.get("first_loss")
        self.step = self.resumed_from = int(state["step"])


Reporter = Callable[[dict[str, Any], Path | None], None]


def run_training(trainer: LoraTrainer, report: Reporter | None = None) -> dict[str, Any]:
    """Train to `config.steps`, calling `report(metrics, checkpoint_dir_or_None)` every `log_every` steps on
    every rank (a checkpoint folder on rank 0 every `checkpoint_every` steps and after the last one; the folder
    is deleted when `report` returns). Returns the final metrics.

    Every collective (loss averaging, `report`) happens at steps that are the same on all ranks."""
    cfg = trainer.config
    report = report or (lambda metrics, checkpoint: None)
    start_step, t0 = trainer.step, time.time()
    window: list[float] = []
    tail: list[float] = []
    tail_len = max(1, cfg.steps // 10)
    metrics: dict[str, Any] = {}
    if trainer.resumed_from is not None:
        trainer.log(f"resumed from the checkpoint at step {trainer.resumed_from}")
    while trainer.step < cfg.steps:
        if cfg.fail_at_step is not None and trainer.step == cfg.fail_at_step and trainer.resumed_from is None:
            raise InjectedFailure(f"fail_at_step={cfg.fail_at_step}: simulated crash before step {trainer.step + 1}")
        loss = trainer.train_step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {trainer.step}; lower learning_rate")
        window.append(loss)
        if trainer.step > cfg.steps - tail_len:
            tail.append(loss)
        step, last = trainer.step, trainer.step == cfg.steps
        checkpoint = step % cfg.checkpoint_every == 0 or last
        if not (step % cfg.log_every == 0 or checkpoint):
            continue
        mean = trainer.mean_across_ranks(float(np.mean(window)))
        window.clear()
        if trainer.first_loss is None:
            trainer.first_loss = mean
        elapsed = time.time() - t0
        rate = elapsed / max(1, step - start_step)
        metrics = {
            "step": step, "steps": cfg.steps, "loss": round(mean, 6), "first_loss": round(trainer.first_loss, 6),
            "lr": trainer.scheduler.get_last_lr()[0], "elapsed_s": round(elapsed, 1),
            "epoch": round(step * cfg.batch_size / (len(trainer.captions) * trainer.world_size), 2),
        }
        if last:
            metrics["final_loss"] = round(trainer.mean_across_ranks(float(np.mean(tail))), 6)
            metrics["train_seconds"] = round(elapsed, 1)
            metrics["resumed_from_step"] = trainer.resumed_from
        trainer.log(f"step {step}/{cfg.steps} loss {mean:.4f} lr {metrics['lr']:.2e} "
                    f"({elapsed:.0f}s, {rate:.2f}s/step, eta {rate * (cfg.steps - step):.0f}s)"
                    + (" [checkpoint]" if checkpoint else ""))
        if checkpoint and trainer.rank == 0:
            with tempfile.TemporaryDirectory(prefix="lora-ckpt-") as tmp:
                report(metrics, trainer.save_checkpoint(tmp, metrics))
        else:
            report(metrics, None)
    return metrics


def train_local(config: TrainConfig, data: ImageCaptionDataset, out_dir: str | Path,
                preset: ModelPreset | None = None) -> tuple[dict[str, Any], Path]:
    """Single-process training (no Ray): trains and writes the adapter into `out_dir`. For tests and dev."""
    preset = preset or load_preset(config.preset)
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    trainer = LoraTrainer(config, preset, data)
    metrics = run_training(trainer)
    return metrics, trainer.save_adapter(out_dir)


# ------------------------------------------------------------------------------------------------ publish


def manifest_fields(config: TrainConfig, preset: ModelPreset, data_hash: str,
                    metrics: dict[str, Any]) -> dict[str, Any]:
    """The `AdapterRegistry.publish` manifest fields of a finished run."""
    return {
        "base_model_id": preset.base_model_id,
        "base_fingerprint": fingerprint_model(preset),
        "rank": config.rank,
        "alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "trigger_words": list(config.trigger_words),
        "visibility": config.visibility,
        "training_config": config.recorded(),
        "dataset_hash": data_hash,
        "metrics": metrics,
    }


def stage_adapter(checkpoint_dir: str | Path, dest: str | Path) -> Path:
    """Copy just the adapter files out of a checkpoint folder (what gets published)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        src = Path(checkpoint_dir) / name
        if not src.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint_dir} has no {name}")
        shutil.copyfile(src, dest / name)
    return dest


# --------------------------------------------------------------------------------------------- evaluation


def concept_hit(concept: str | None, image: Image.Image, expected: Any) -> bool:
    """Does `image` show `concept`: a style of the world (`STYLES`, e.g. "frame": read by `read_frame`), or a
    shape (the prompt's shape, as `score` reads it)? None: the prompt's shape."""
    from lightray.world.evaluator import read_frame, score
    from lightray.world.shapes import STYLES

    if concept in STYLES:
        return read_frame(image)
    return bool(score(image, expected)["shape"])


def rates(concept: str | None, images: Sequence[Image.Image], expected: Sequence[Any]) -> dict[str, Any]:
    """The evaluator's rates over `images` (each against its expected Scene): "concept" (see `concept_hit`),
    "frame" (framed images), "shape" (the prompt's shape read), "all" (colour, shape, position and background all
    right), and the shapes read."""
    from lightray.world.evaluator import read_image, score

    n = len(images)
    counts = {"concept": 0, "frame": 0, "shape": 0, "all": 0}
    drawn: dict[str, int] = {}
    for im, scene in zip(images, expected):
        s, reading = score(im, scene), read_image(im)
        counts["concept"] += concept_hit(concept, im, scene)
        counts["frame"] += reading.frame
        counts["shape"] += s["shape"]
        counts["all"] += s["all"]
        drawn[str(reading.shape)] = drawn.get(str(reading.shape), 0) + 1
    return {**{f"{k}_rate": v / max(1, n) for k, v in counts.items()}, "n": n, "shapes_read": dict(sorted(drawn.items()))}


def evaluate_adapter(preset: ModelPreset | str, adapter_dir: str | Path | None, prompts: Sequence[str],
                     seeds: Sequence[int], variants: Sequence[str | None] = (None,),
                     adapter_scale: float = 1.0, concept: str | None = None) -> dict[str, Any]:
    """Generate every prompt × seed with and without the adapter for each variant and read the images back
    with the world evaluator. Returns per-variant `rates` ("concept": `concept` drawn; "shape": the prompt's shape
    drawn; "all": every attribute right) and the images (for a before/after figure). Prompts must parse with
    `parse_prompt`."""
    from lightray.contracts import AdapterUse
    from lightray.pipeline import LocalPipeline
    from lightray.schemas import ImageGenerationRequest
    from lightray.world.evaluator import parse_prompt

    preset = load_preset(preset)
    pipeline = LocalPipeline(preset)
    adapter_paths = {} if adapter_dir is None else {"eval": str(adapter_dir)}
    expected = [parse_prompt(p) for p in prompts]
    results: dict[str, Any] = {}
    for variant in variants:
        vid = preset.variant(variant).id
        per: dict[str, Any] = {}
        for label, adapter in (("without", None), ("with", "eval")):
            if adapter is not None and adapter_dir is None:
                continue
            images: list[list[Image.Image]] = []
            for prompt, scene in zip(prompts, expected):
                spec = ImageGenerationRequest(prompt=prompt, model=vid, n=len(seeds), seeds=list(seeds)).resolve(
                    preset, 0)
                if adapter is not None:
                    spec = dataclasses.replace(spec, adapters=(AdapterUse(adapter, adapter_scale),))
                imgs = pipeline.generate(spec, adapter_paths)
                images.append(imgs)
            flat = [im for imgs in images for im in imgs]
            per[label] = {**rates(concept, flat, [sc for sc in expected for _ in seeds]), "images": images}
        results[vid] = per
    return results


def acceptance_prompts(concept: str, trigger: str | None, count: int = 24,
                       prior_count: int = 12) -> tuple[list[str], list[str]]:
    """The fixed prompt sets of the adapter acceptance: `count` concept prompts (canonical phrasing with the trigger
    word, alternating EN/ZH; for a style the shape cycles through the base shapes) and `prior_count` prompts of
    base shapes without the trigger. Deterministic (seeded)."""
    from lightray.world.datasets import caption_with_trigger
    from lightray.world.shapes import BACKGROUNDS, POSITIONS, SHAPE_COLORS, SHAPES, STYLES, Scene

    style = concept if concept in STYLES else None
    rng = random.Random(1234)
    combos = [(c, p, b) for c in SHAPE_COLORS for p in POSITIONS for b in BACKGROUNDS]
    rng.shuffle(combos)
    lang = lambda i: "en" if i % 2 == 0 else "zh"  # noqa: E731
    prompts = [caption_with_trigger(Scene(c, SHAPES[i % len(SHAPES)] if style else concept, p, b), lang(i), 0,
                                    trigger, style)
               for i, (c, p, b) in enumerate(combos[:count])]
    prior = [Scene(c, rng.choice([s for s in SHAPES if s != concept]), p, b).caption(lang(i), 0)
             for i, (c, p, b) in enumerate(combos[count: count + prior_count])]
    return prompts, prior


def _evaluate_main(argv: list[str] | None = None) -> int:
    """`python -m lightray.lora_training evaluate ...`: the adapter-vs-base measurement in docs/adapters.md.

    Concept prompts: `--prompts` scenes of `--concept` (a shape such as "ring", or a style such as "frame" over the
    base shapes; colour/position/background drawn at random with a fixed seed; alternating EN/ZH; canonical
    phrasing with the trigger word). Prior prompts: `--prior-prompts` scenes of the base shapes without the
    trigger (does the adapter leave what the base draws alone?)."""

    parser = argparse.ArgumentParser(prog="python -m lightray.lora_training evaluate")
    parser.add_argument("--adapter", required=True, help="adapter folder (e.g. a registry version folder)")
    parser.add_argument("--preset", default="lightray-shapes")
    parser.add_argument("--concept", "--shape", dest="concept", default="frame",
                        help="a style ('frame') or a shape ('ring') of the shapes world")
    parser.add_argument("--trigger", default=None)
    parser.add_argument("--prompts", type=int, default=24, help="concept prompts, half EN, half ZH")
    parser.add_argument("--prior-prompts", type=int, default=12, help="base-shape prompts without the trigger")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=["lightray-shapes-lightning-8", "lightray-shapes"])
    parser.add_argument("--figure", default=None, help="write a before/after PNG of the concept prompts here")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    prompts, prior = acceptance_prompts(args.concept, args.trigger, args.prompts, args.prior_prompts)
    t0 = time.time()
    strip = lambda res: {v: {k: {m: x for m, x in r.items() if m != "images"}  # noqa: E731
                             for k, r in per.items()} for v, per in res.items()}
    concept = evaluate_adapter(args.preset, args.adapter, prompts, args.seeds, args.variants,
                               concept=args.concept)
    summary: dict[str, Any] = {"seeds": args.seeds, "concept_prompts": prompts, "concept": strip(concept)}
    if prior:
        summary["prior_prompts"] = prior
        summary["prior"] = strip(evaluate_adapter(args.preset, args.adapter, prior, args.seeds, args.variants,
                                                  concept=args.concept))
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({k: summary[k] for k in ("concept", "prior") if k in summary}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if args.figure:
        before_after_figure(concept, prompts, Path(args.figure))
        print(f"figure: {args.figure}")
    return 0


def before_after_figure(results: dict[str, Any], prompts: Sequence[str], path: Path, rows: int = 6,
                        scale: int = 2) -> Path:
    """A grid: one row per prompt (its first seed), one column per (variant, without/with adapter); the left
    column names what the prompt asks for (in English, whatever its language)."""
    from PIL import ImageDraw

    from lightray.world.evaluator import parse_prompt

    cols = [(v, k) for v, per in results.items() for k in ("without", "with") if k in per]
    first = next(iter(results.values()))["without"]["images"][0][0]
    cell = first.size[0] * scale
    head, label_w, rows = 30, 120, min(rows, len(prompts))
    fig = Image.new("RGB", (label_w + cell * len(cols), head + cell * rows), "white")
    draw = ImageDraw.Draw(fig)
    for j, (v, k) in enumerate(cols):
        short = "base (30 steps, CFG)" if v == "lightray-shapes" else v.replace("lightray-shapes-", "")
        draw.text((label_w + j * cell + 4, 3), short, fill="black")
        draw.text((label_w + j * cell + 4, 15), f"{k} LoRA", fill="black")
        for i in range(rows):
            im = results[v][k]["images"][i][0].resize((cell, cell), Image.Resampling.NEAREST)
            fig.paste(im, (label_w + j * cell, head + i * cell))
    for i, prompt in enumerate(prompts[:rows]):
        scene = parse_prompt(prompt)
        lang = "ZH" if any(ord(ch) > 127 for ch in prompt) else "EN"
        lines = [f"prompt {i + 1} ({lang})", f"{scene.color} {scene.shape}", scene.position,
                 f"{scene.background} background"]
        styled = re.match(r"(\w+)(?: style,|风格，)", prompt)
        if styled:
            lines.append(f"+ {styled.group(1)} style")
        for n, line in enumerate(lines):
            draw.text((4, head + i * cell + 8 + 14 * n), line, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "evaluate":
        sys.exit(_evaluate_main(sys.argv[2:]))
    print("usage: python -m lightray.lora_training evaluate --adapter DIR [--trigger WORD] [--figure PNG]",
          file=sys.stderr)
    sys.exit(2)

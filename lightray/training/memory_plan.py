"""The memory plan of a training run, per GPU, computed from configs alone (`lightray train estimate CONFIG`).

Two phases run on each worker's GPU, one after the other (the caching pass frees its encoders before the transformer
loads), so the GPU must hold the larger of:

* the caching pass: the text encoder with one forward of `cache_text_batch_size` captions at the tokenizer's longest
  input, then the VAE with one encode of `cache_vae_batch_size` images at the largest bucket;
* training: the frozen transformer in the preset's dtype, the float32 LoRA matrices, their gradients, the optimizer
  state (AdamW: two float32 moments; 8-bit AdamW: two bytes), DDP's gradient buckets (a second copy of the gradients
  when there is more than one worker), and the activations of one micro-batch's forward and backward at the largest
  bucket with the preset's longest prompt.

Weights are counted and activations measured on the meta device (`lightray.meta_models`) from the config.json files
in `model_configs` (configs/qwen-image for the real model: no weights needed). The activations are measured on 2- and
3-block twins of the transformer with the run's LoRA, forward and backward, with and without gradient checkpointing:
without it every block keeps what its backward needs, with it only each block's inputs, so the peak grows by the
same amount per block and the full depth is extrapolated from the twins (a test checks the growth is linear). The
meta device has no autocast, so the LoRA branch is measured in float32 (peft casts its input up): an overestimate of
the bf16 autocast path. CUDA context and workspaces are the GPU class's assumption (`reserved_mib_per_process`).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from lightray.config import REPO_ROOT, ModelPreset, load_preset
from lightray.meta_models import (
    DTYPE_BYTES,
    GIB,
    MIB,
    GpuClass,
    MetaModels,
    PeakLiveBytes,
    image_tokens,
    memory_efficient_attention,
    text_encoder_tokens,
)
from lightray.training.buckets import resolve_buckets
from lightray.training.config import TrainConfig

HOST_OVERHEAD_BYTES = 8 * GIB
"""ASSUMED, per worker process besides the staged weights: Python, torch and CUDA libraries, the Ray worker, the data
set shard and its encoded inputs (a few GiB for thousands of 1024² images)."""
LIGHTNING_RANK = 64
"""Rank of the published Qwen-Image-Lightning LoRAs (on every linear of a block), held frozen in the preset's dtype
when `train_with_lightning` is set (as serving's budget counts them)."""
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2}
"""Bytes of optimizer state per trained parameter: two float32 moments, or two 8-bit ones."""


def resolve_repo_path(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def load_gpu_class(path: str) -> GpuClass:
    """The `gpu:` section of a GPU-class file under configs/capacity/ (the one serving is sized with)."""
    data = yaml.safe_load(resolve_repo_path(path).read_text())
    return GpuClass.model_validate(data["gpu"])


@lru_cache(maxsize=4)
def meta_models(folder: str) -> MetaModels:
    return MetaModels.build(Path(folder))


def training_activation_bytes(models: MetaModels, dtype: str, rows: int, width: int, height: int, text_tokens: int,
                              rank: int, targets: list[str], checkpointing: bool, layers: int = 2) -> int:
    """Peak bytes of one training forward and backward of a `layers`-block twin of the transformer (frozen in
    `dtype`, with a float32 rank-`rank` LoRA on `targets`) over `rows` images at `width` x `height` with
    `text_tokens`-token prompts (`MetaModels.transformer_twin` and `transformer_inputs`)."""
    model = models.transformer_twin(layers, dtype, rank, targets)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    # Under autocast the first linear turns the float32 latents into the compute dtype: start there.
    inputs = models.transformer_inputs(dtype, rows, width, height, text_tokens)
    with memory_efficient_attention(), PeakLiveBytes(model, *(v for v in inputs.values() if hasattr(v, "shape"))
                                                     ) as tracked:
        out = model(**inputs)[0]
        out.float().pow(2).mean().backward()
        del out
    return tracked.peak


def deep_activation_bytes(models: MetaModels, checkpointing: bool, **kwargs) -> int:
    """`training_activation_bytes` at the model's full depth: the 2-block peak plus the 2→3 growth per block."""
    two = training_activation_bytes(models, checkpointing=checkpointing, layers=2, **kwargs)
    three = training_activation_bytes(models, checkpointing=checkpointing, layers=3, **kwargs)
    return two + (models.configs["transformer"]["num_layers"] - 2) * (three - two)


@dataclasses.dataclass(frozen=True)
class TrainMemoryPlan:
    """Bytes per GPU of each phase, by item, and what the GPU class offers."""

    config: TrainConfig
    preset: ModelPreset
    gpu: GpuClass | None
    bucket: tuple[int, int]
    checkpointing: bool
    lora_parameters: int
    text_encoding: dict[str, int]
    vae_encoding: dict[str, int]
    training: dict[str, int]
    activations_with_checkpointing: int
    activations_without_checkpointing: int
    host_bytes: int
    """Host memory a worker needs (its pod's memory, /dev/shm aside): the larger model staged through host RAM by
    `from_pretrained` before it moves to the GPU, plus `HOST_OVERHEAD_BYTES`."""

    @property
    def caching_peak(self) -> int:
        return max(sum(self.text_encoding.values()), sum(self.vae_encoding.values()))

    @property
    def training_peak(self) -> int:
        return sum(self.training.values())

    def training_peak_with(self, checkpointing: bool) -> int:
        other = self.activations_with_checkpointing if checkpointing else self.activations_without_checkpointing
        return self.training_peak - self.training["activations"] + other

    @property
    def peak(self) -> int:
        return max(self.caching_peak, self.training_peak)

    @property
    def available(self) -> int | None:
        return None if self.gpu is None else self.gpu.memory_mib * MIB

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= self.available

    def as_json(self) -> dict[str, Any]:
        gib = lambda v: round(v / GIB, 2)  # noqa: E731
        return {
            "config": f"{self.config.tenant}/{self.config.name}", "preset": self.preset.name,
            "dtype": self.preset.dtype, "gpu": self.gpu.name if self.gpu else None,
            "largest_bucket": f"{self.bucket[0]}x{self.bucket[1]}", "micro_batch": self.config.micro_batch,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
            "gradient_checkpointing": self.checkpointing, "lora_parameters": self.lora_parameters,
            "caching_text_encoder_gib": {k: gib(v) for k, v in self.text_encoding.items()},
            "caching_vae_gib": {k: gib(v) for k, v in self.vae_encoding.items()},
            "training_gib": {k: gib(v) for k, v in self.training.items()},
            "caching_peak_gib": gib(self.caching_peak),
            "training_peak_gib": gib(self.training_peak),
            "training_peak_with_checkpointing_gib": gib(self.training_peak_with(True)),
            "training_peak_without_checkpointing_gib": gib(self.training_peak_with(False)),
            "peak_gib": gib(self.peak),
            "available_gib": None if self.available is None else gib(self.available),
            "fits": self.fits, "host_memory_per_worker_gib": gib(self.host_bytes),
        }

    def table(self) -> str:
        """The plan as a Markdown table (what `lightray train estimate` prints)."""
        gib = lambda v: f"{v / GIB:.2f}"  # noqa: E731
        c, (w, h) = self.config, self.bucket
        lines = [
            f"Memory plan per GPU: {c.tenant}/{c.name} on {self.preset.name} ({self.preset.dtype}), "
            f"{self.gpu.name + f' ({self.gpu.memory_mib} MiB)' if self.gpu else 'no GPU class declared'}",
            f"largest bucket {w}x{h}, micro-batch {c.micro_batch} x {c.gradient_accumulation_steps} accumulation "
            f"step(s) x {c.num_workers} worker(s), LoRA rank {c.rank} ({self.lora_parameters / 1e6:.0f}M parameters), "
            f"optimizer {c.optimizer}, gradient checkpointing {'on' if self.checkpointing else 'off'}",
            "",
            "| phase | item | GiB |", "| --- | --- | ---: |",
        ]
        for phase, items in (("caching: text encoder", self.text_encoding), ("caching: VAE", self.vae_encoding),
                             ("training", self.training)):
            lines += [f"| {phase} | {k.replace('_', ' ')} | {gib(v)} |" for k, v in items.items()]
        lines += [
            f"| training | activations with checkpointing | {gib(self.activations_with_checkpointing)} |",
            f"| training | activations without checkpointing | {gib(self.activations_without_checkpointing)} |",
            f"| **peak** | caching pass | **{gib(self.caching_peak)}** |",
            f"| **peak** | training, as configured | **{gib(self.training_peak)}** |",
            f"| peak | training with checkpointing | {gib(self.training_peak_with(True))} |",
            f"| peak | training without checkpointing | {gib(self.training_peak_with(False))} |",
        ]
        if self.available is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"| GPU | available | {gib(self.available)} ({verdict}, headroom "
                         f"{gib(self.available - self.peak)}) |")
        lines.append(f"| host | memory per worker (besides /dev/shm) | {gib(self.host_bytes)} |")
        return "\n".join(lines)


def plan_memory(config: TrainConfig, preset: ModelPreset | None = None) -> TrainMemoryPlan:
    """The memory plan of `config` (see the module docstring)."""
    preset = preset or load_preset(config.preset)
    folder = resolve_repo_path(config.model_configs) if config.model_configs else preset.root
    models = meta_models(str(folder))
    dtype, b = preset.dtype, DTYPE_BYTES[preset.dtype]
    gpu = load_gpu_class(config.gpu) if config.gpu else None
    reserved = gpu.reserved_mib_per_process * MIB if gpu else 0
    bucket = resolve_buckets(config, preset).largest
    transformer_params = models.parameters(models.transformer)
    checkpointing = config.checkpointing_for(transformer_params)
    lora = models.lora_parameters(config.rank, config.target_modules)
    measure = dict(dtype=dtype, rows=config.micro_batch, width=bucket[0], height=bucket[1],
                   text_tokens=preset.max_sequence_length, rank=config.rank, targets=config.target_modules)
    with_ckpt = deep_activation_bytes(models, True, **measure)
    without_ckpt = deep_activation_bytes(models, False, **measure)
    text_encoding = {
        "weights": models.parameters(models.text_encoder) * b,
        "activations": models.text_encoder_activation_bytes(dtype, config.cache_text_batch_size,
                                                            text_encoder_tokens(preset, pictures=0)),
        "cuda_reserved": reserved,
    }
    vae_encoding = {
        "weights": models.parameters(models.vae) * b,
        "activations": models.vae_encode_activation_bytes(dtype, config.cache_vae_batch_size, *bucket),
        "cuda_reserved": reserved,
    }
    training = {
        "weights": transformer_params * b,
        **({"lightning_lora": models.lora_parameters(LIGHTNING_RANK) * b} if config.train_with_lightning else {}),
        "lora_parameters": lora * 4,
        "gradients": lora * 4,
        "optimizer_state": lora * OPTIMIZER_STATE_BYTES[config.optimizer],
        "ddp_buckets": lora * 4 if config.num_workers > 1 else 0,
        "activations": with_ckpt if checkpointing else without_ckpt,
        "cuda_reserved": reserved,
    }
    staged = max(models.parameters(models.text_encoder), transformer_params) * b
    return TrainMemoryPlan(config, preset, gpu, bucket, checkpointing, lora, text_encoding, vae_encoding, training,
                           with_ckpt, without_ckpt, staged + HOST_OVERHEAD_BYTES)

"""`LoraTrainer`: LoRA on the preset's transformer, trained with the base model's own objective (rectified flow,
shifted logit-normal times, VAE latents normalised the way the pipeline decodes them, captions through the frozen
text encoder); `run_training`: the loop, its reports and checkpoints (every collective at the same step on all
ranks)."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lightray.config import ModelPreset
from lightray.fingerprint import fingerprint_model
from lightray.stages.common import torch_dtype
from lightray.training.buckets import resolve_buckets
from lightray.training.cache import EMPTY_CAPTIONS, cached_inputs
from lightray.training.config import TrainConfig
from lightray.training.data import ImageCaptionDataset
from lightray.training.flow_matching import PREDICTORS, shift_sigmas, warmup_cosine
from lightray.training.lora import (
    TRAINED_ADAPTER,
    add_lora,
    is_trained_lora,
    lightning_lora_path,
    load_adapter_weights,
    load_lightning,
    lora_state_dict,
    save_adapter,
)
from lightray.training.publish import TRAINER_STATE

TRAINING_STATE = "training_state.pt"


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over the LoRA parameters: torch's, or bitsandbytes' 8-bit one (`TrainConfig.optimizer`)."""
    if config.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


class InjectedFailure(RuntimeError):
    """The crash `TrainConfig.fail_at_step` asks for."""


class LoraTrainer:
    """LoRA on the preset's transformer, trained on (one worker's shard of) a data set.

    Distributed use: construct on every rank with the same config (LoRA init is seeded, so every rank starts
    from identical weights), then `wrap(fn)` the model with a data-parallel wrapper (DDP) before training. A
    rank's forward runs `batch_size // (world_size x gradient_accumulation_steps)` images.
    """

    def __init__(self, config: TrainConfig, preset: ModelPreset, data: ImageCaptionDataset, *, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", log: Callable[[str], None] = print):
        import diffusers

        self.config, self.preset, self.rank, self.world_size = config, preset, rank, world_size
        self.device = torch.device(device)
        self.log = log if rank == 0 else (lambda msg: None)
        buckets = resolve_buckets(config, preset)
        lightning = lightning_lora_path(config, preset)
        if len(data) < world_size:
            raise ValueError(f"the data set has {len(data)} images, fewer than the {world_size} workers")
        unknown = set(data.bucket_counts()) - set(buckets.sizes)
        if unknown:
            raise ValueError(f"data set images are {sorted(unknown)}, not the config's buckets {buckets.describe()}")
        self.batch = config.batch_size // (world_size * config.gradient_accumulation_steps)
        # Encoded before the transformer loads (the encoders are freed first): one model on the device at a time.
        self.inputs = cached_inputs(config, preset, data, rank, world_size, self.device, log=self.log)
        self.buckets = sorted(self.inputs.captions)
        self.bucket_weights = [len(self.inputs.captions[b]) for b in self.buckets]
        self.examples = len(self.inputs)
        self.bucket_draws: dict[tuple[int, int], int] = dict.fromkeys(self.buckets, 0)
        """Micro-batches drawn from each bucket by this rank so far (for the log)."""

        torch.manual_seed(config.seed)  # identical LoRA initialisation on every rank
        # The base stays frozen in the preset's dtype (bf16 for the real model: half of fp32's 76 GiB); the LoRA
        # trains in float32, and the forward runs under autocast to the preset's dtype.
        self.dtype = torch_dtype(preset.dtype)
        transformer_class = preset.model_family.transformer_class
        self.predict = PREDICTORS[transformer_class]
        self.transformer = getattr(diffusers, transformer_class).from_pretrained(
            preset.root / "transformer", torch_dtype=self.dtype).to(self.device)
        if lightning is not None:
            load_lightning(self.transformer, lightning)
            self.log(f"training on top of {config.train_with_lightning}'s Lightning LoRA ({lightning.name}, frozen)")
        self.params = add_lora(self.transformer, config, preset.base_model_id)
        self.lora_config = self.transformer.peft_config[TRAINED_ADAPTER]
        lora_tensors = sum(1 for n, _ in self.transformer.named_parameters() if is_trained_lora(n))
        if len(self.params) < lora_tensors:
            self.log(f"{lora_tensors - len(self.params)} of {lora_tensors} LoRA tensors do not affect the output "
                     "(last block's text stream) and stay frozen")
        self.checkpointing = config.checkpointing_for(sum(p.numel() for p in self.transformer.parameters()))
        if self.checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.model: torch.nn.Module = self.transformer
        self.optimizer = make_optimizer(config, self.params)
        self.scheduler = warmup_cosine(self.optimizer, config.steps, warmup=config.warmup_steps)
        self.rng = random.Random(config.seed * 1_000_003 + rank)
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rank)
        self.step = 0
        self.resumed_from: int | None = None
        self.first_loss: float | None = None
        """Mean loss of the first reporting window of the run (kept across resumes)."""

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def wrap(self, wrapper: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Replace the module the forward pass calls (e.g. with DDP); weights stay those of `self.transformer`."""
        self.model = wrapper(self.transformer)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's precision: the preset's dtype on its device (CUDA bf16; CPU bf16 for a bf16 preset), so
        the float32 LoRA matrices and float32 inputs meet the bf16 base in bf16 matmuls; off for a float32
        preset."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def micro_batch_loss(self) -> torch.Tensor:
        """The flow-matching loss of one micro-batch from one bucket of this rank's shard (float32, with its
        graph). Buckets are drawn in proportion to their images, so every image is as likely as in one pool."""
        cfg = self.config
        # One bucket only (the square mode): no draw, so its batches are what they were before buckets existed.
        bucket = self.buckets[0] if len(self.buckets) == 1 else self.rng.choices(self.buckets, self.bucket_weights)[0]
        self.bucket_draws[bucket] += 1
        captions = self.inputs.captions[bucket]
        idx = [self.rng.randrange(len(captions)) for _ in range(self.batch)]
        # Dropped captions become "" or " " (the pipeline's default negative prompt), as in the base's training.
        caps = [self.rng.choice(EMPTY_CAPTIONS) if cfg.caption_dropout and self.rng.random() < cfg.caption_dropout
                else captions[i] for i in idx]
        embeds, mask = self.inputs.text.batch(caps)
        x0 = self.inputs.latents[bucket][idx].to(self.device, torch.float32)
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        sigma = shift_sigmas(torch.sigmoid(torch.randn(self.batch, generator=self.generator)), cfg.timestep_shift)
        sigma = sigma.to(self.device)
        s = sigma.view(-1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        width, height = bucket
        grid = (height // 16, width // 16)  # VAE 8x, then 2x2 patches (2.1: VAE 16x, unpatched)
        with self.autocast():
            v = self.predict(self.model, xt, sigma, embeds.to(self.device), mask.to(self.device), grid)
        return F.mse_loss(v.float(), noise - x0)

    def train_step(self) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns this rank's mean loss."""
        cfg = self.config
        accumulate = cfg.gradient_accumulation_steps
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accumulate):
            # Under DDP, gradients are all-reduced only in the backward of the last micro-batch.
            last = micro == accumulate - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss = self.micro_batch_loss()
                (loss / accumulate).backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return total / accumulate

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
        return lora_state_dict(self.transformer)

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the adapter files serving loads (`lightray.training.lora`) into `folder`."""
        return save_adapter(self.transformer, folder)

    def save_checkpoint(self, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """The adapter plus optimizer/scheduler/RNG state: `load_checkpoint` continues exactly here."""
        folder = self.save_adapter(folder)
        torch.save({
            "step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": self.rng.getstate(), "generator": self.generator.get_state(), "world_size": self.world_size,
            "first_loss": self.first_loss,
        }, folder / TRAINING_STATE)
        # The fingerprint travels with the checkpoint: the driver publishes it without ever reading the weights.
        state = {"step": self.step, "base_fingerprint": self.base_fingerprint, **(metrics or {})}
        (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        return folder

    @functools.cached_property
    def base_fingerprint(self) -> str:
        """`fingerprint_model` of the weights this worker trains on (file hashes, cached on the node)."""
        return fingerprint_model(self.preset)

    def load_checkpoint(self, folder: str | Path) -> None:
        folder = Path(folder)
        load_adapter_weights(self.transformer, folder)
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
            "epoch": round(step * cfg.batch_size / (trainer.examples * trainer.world_size), 2),
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

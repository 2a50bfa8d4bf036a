"""The CPU proof of the real-model trainer: the mini real Qwen-Image folder (tests/mini_real.py: the published
configs with small widths, real class and key names, 2 blocks, bf16 weights) trained with configs/train/qwen-image.yaml
(its rank, targets and recipe; tiny sizes): the caching pass, 2 optimizer steps of a bf16 base with fp32 LoRA and
gradient checkpointing over two aspect-ratio buckets, publishing to a local registry, and the published adapter
loaded and served on top of a Lightning LoRA through the serving stages."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightray.config import REPO_ROOT, load_preset
from lightray.training.buckets import resolve_buckets
from lightray.training.config import load_train_config
from lightray.training.data import load_imagefolder
from lightray.training.trainer import LoraTrainer, run_training
from mini_real import build_mini_real, captioned_dataset, publish_trained, write_lightning_lora

REAL_TRAIN_CONFIG = REPO_ROOT / "configs/train/qwen-image.yaml"
REAL_PRESET = REPO_ROOT / "configs/models/qwen-image-lightning.yaml"
BUCKETS = [(256, 256), (384, 256)]
"""Two sizes the real preset serves (it refuses sides under 256): square and 3:2."""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_preset(tmp_path_factory) -> dict:
    """configs/models/qwen-image-lightning.yaml over the mini real folder: only path, device and the LoRA files."""
    root = build_mini_real(tmp_path_factory.mktemp("mini-real") / "Qwen-Image")
    raw = yaml.safe_load(REAL_PRESET.read_text())
    raw["path"], raw["device"] = str(root), "cpu"
    for i, variant in enumerate(raw["variants"]):
        if variant.get("lightning_lora"):
            variant["lightning_lora"] = str(root.parent / "lightning" / f"{variant['id']}.safetensors")
            write_lightning_lora(Path(variant["lightning_lora"]), seed=10 + i)
    return raw


def _config(mini_preset: dict, tmp_path: Path, **overrides):
    """configs/train/qwen-image.yaml with the mini model, tiny sizes and a CPU worker."""
    return load_train_config(REAL_TRAIN_CONFIG, {
        "preset": mini_preset, "dataset": str(captioned_dataset(tmp_path / "data", ((420, 270), (300, 290)))),
        "registry": str(tmp_path / "registry"),
        "buckets": BUCKETS, "steps": 2, "batch_size": 2, "gradient_accumulation_steps": 2, "num_workers": 1,
        "use_gpu": False, "gpu": None, "model_configs": None, "storage_path": None,
        "input_cache": str(tmp_path / "input-cache"), "log_every": 1, "checkpoint_every": 2, "warmup_steps": 1,
        "learning_rate": 1e-3, "torch_threads": 1, "seed": 1, **overrides,
    })


def test_caching_pass_training_and_publishing_on_the_real_layout_then_serving_on_lightning(mini_preset, tmp_path):
    from lightray.adapters import fetch_for_preset
    from lightray.contracts import AdapterUse
    from lightray.pipeline import LocalPipeline
    from lightray.schemas import ImageGenerationRequest

    torch.set_num_threads(1)
    cfg = _config(mini_preset, tmp_path)
    preset = load_preset(cfg.preset)
    assert cfg.gradient_checkpointing and preset.dtype == "bfloat16"

    # Validation and bucketing (the driver's part): each image at the largest bucket of its ratio it covers.
    data = load_imagefolder(cfg.dataset, resolve_buckets(cfg, preset), skip_bad_images=cfg.skip_bad_images)
    assert data.bucket_counts() == {(256, 256): 3, (384, 256): 3}

    # The worker's part: the caching pass, then the transformer (bf16, frozen) with float32 LoRA matrices.
    logs: list[str] = []
    trainer = LoraTrainer(cfg, preset, data, log=logs.append)
    assert any("caching pass on cpu" in line for line in logs)
    assert list((tmp_path / "input-cache").rglob("rank-0-of-1.pt"))
    assert {t.dtype for t in trainer.inputs.latents.values()} == {torch.bfloat16}
    assert {t.dtype for t in trainer.inputs.text.embeds} == {torch.bfloat16}
    assert trainer.checkpointing and trainer.transformer.gradient_checkpointing
    base = {p.dtype for n, p in trainer.transformer.named_parameters() if "lora_" not in n}
    assert base == {torch.bfloat16} and {p.dtype for p in trainer.params} == {torch.float32}
    assert not any(p.requires_grad for n, p in trainer.transformer.named_parameters() if "lora_" not in n)
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if p.requires_grad}

    checkpoints = []
    metrics = run_training(trainer, lambda m, ckpt: checkpoints.append(ckpt) if ckpt else None)
    assert metrics["step"] == 2 and math.isfinite(metrics["final_loss"])
    assert all(n > 0 for n in trainer.bucket_draws.values()), trainer.bucket_draws  # both buckets trained
    changed = [n for n, p in trainer.transformer.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), before[n])]
    assert changed, "two optimizer steps moved the LoRA"

    # Publishing: the adapter files of the final checkpoint, the worker's fingerprint, a local registry.
    registry, manifest = publish_trained(trainer, cfg, preset, data, metrics, tmp_path)
    assert (manifest.rank, manifest.base_model_id) == (32, "qwen-image")

    # Serving: the published adapter on top of the Lightning variant, through the text, engine and VAE stages.
    pipeline = LocalPipeline(preset)
    _, adapter_dir = fetch_for_preset(registry, manifest.ref, preset)  # the serving compatibility check
    spec = ImageGenerationRequest(prompt="lrzstyle, a red square, picture 1", model="qwen-image-lightning-4",
                                  size="384x256", seed=3).resolve(preset, 0)
    assert pipeline.preset.variant(spec.model).lightning_lora
    plain = np.asarray(pipeline.generate(spec)[0])
    styled = np.asarray(pipeline.generate(dataclasses.replace(spec, adapters=(AdapterUse(manifest.ref, 1.0),)),
                                          {manifest.ref: str(adapter_dir)})[0])
    assert plain.shape == styled.shape == (256, 384, 3)
    assert np.abs(styled.astype(int) - plain.astype(int)).max() > 0, "the adapter changes what is served"
    again = np.asarray(pipeline.generate(spec)[0])
    np.testing.assert_array_equal(again, plain)  # and only for the request that names it


def test_training_on_top_of_a_lightning_lora_trains_only_the_new_one(mini_preset, tmp_path):
    """`train_with_lightning`: the variant's Lightning LoRA is active (scale 1) and frozen while the adapter trains;
    the adapter files hold only the new LoRA, with the same keys as one trained against the base."""
    from safetensors.torch import load_file

    from lightray.training.lora import ADAPTER_WEIGHTS, LIGHTNING_ADAPTER

    torch.set_num_threads(1)
    cfg = _config(mini_preset, tmp_path, steps=1, train_with_lightning="qwen-image-lightning-4")
    preset = load_preset(cfg.preset)
    trainer = LoraTrainer(cfg, preset, load_imagefolder(cfg.dataset, resolve_buckets(cfg, preset)))
    assert set(trainer.transformer.active_adapters()) == {LIGHTNING_ADAPTER, "default"}
    lightning = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters()
                 if f".{LIGHTNING_ADAPTER}." in n}
    assert lightning and not any(p.requires_grad for n, p in trainer.transformer.named_parameters()
                                 if f".{LIGHTNING_ADAPTER}." in n)
    run_training(trainer)
    params = dict(trainer.transformer.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in lightning.items())
    saved = load_file(trainer.save_adapter(tmp_path / "adapter") / ADAPTER_WEIGHTS)
    assert saved and not any(LIGHTNING_ADAPTER in k for k in saved)
    with pytest.raises(ValueError, match="not a Lightning variant"):
        LoraTrainer(cfg.model_copy(update={"train_with_lightning": "qwen-image"}), preset,
                    load_imagefolder(cfg.dataset, resolve_buckets(cfg, preset)))

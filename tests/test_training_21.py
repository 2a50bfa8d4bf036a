"""The CPU proof of the trainer on Qwen-Image-2.1: the mini real-layout 2.1 Turbo (`tests/mini_real.py`,
`build_mini_real_21`) trained with configs/train/qwen-image-2.1.yaml (its rank, targets and recipe; tiny sizes): the
caching pass through the 2.1 text and VAE stages, 2 optimizer steps of a bf16 base with fp32 LoRA and gradient
checkpointing over two aspect-ratio buckets, publishing to a local registry, and the published adapter served on
Turbo through the stages."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml

from lightray.config import REPO_ROOT, load_preset
from lightray.training.buckets import resolve_buckets
from lightray.training.config import load_train_config
from lightray.training.data import load_imagefolder
from lightray.training.trainer import LoraTrainer, run_training
from mini_real import build_mini_real_21, captioned_dataset, publish_trained

TRAIN_CONFIG = REPO_ROOT / "configs/train/qwen-image-2.1.yaml"
BUCKETS = [(128, 128), (192, 128)]
"""Two sizes the mini preset serves (multiples of 32): square and 3:2."""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def mini_preset(tmp_path_factory) -> dict:
    """configs/models/qwen-image-2.1-turbo.yaml over the mini Turbo folder, on the CPU, with the toy's sizes."""
    root = build_mini_real_21(tmp_path_factory.mktemp("mini-21") / "Qwen-Image-2.1-Turbo", turbo=True)
    raw = yaml.safe_load((REPO_ROOT / "configs/models/qwen-image-2.1-turbo.yaml").read_text())
    raw.update(path=str(root), device="cpu", min_side=32, max_side=256, max_pixels=256 * 256,
               default_size=[128, 128])
    return raw


def test_training_2_1_two_steps_publishing_and_serving_the_adapter_on_turbo(mini_preset, tmp_path):
    from lightray.adapters import fetch_for_preset
    from lightray.contracts import AdapterUse
    from lightray.models.qwen_image_21 import TRANSFORMER_BLOCK_LINEARS
    from lightray.pipeline import LocalPipeline
    from lightray.schemas import ImageGenerationRequest

    cfg = load_train_config(TRAIN_CONFIG, {
        "preset": mini_preset, "dataset": str(captioned_dataset(tmp_path / "data", ((210, 135), (150, 140)))),
        "registry": str(tmp_path / "registry"),
        "buckets": BUCKETS, "steps": 2, "batch_size": 2, "gradient_accumulation_steps": 2, "num_workers": 1,
        "use_gpu": False, "storage_path": None, "input_cache": str(tmp_path / "input-cache"), "log_every": 1,
        "checkpoint_every": 2, "warmup_steps": 1, "learning_rate": 1e-3, "torch_threads": 1, "seed": 1,
    })
    preset = load_preset(cfg.preset)
    assert tuple(cfg.target_modules) == TRANSFORMER_BLOCK_LINEARS and preset.dtype == "bfloat16"
    data = load_imagefolder(cfg.dataset, resolve_buckets(cfg, preset), skip_bad_images=cfg.skip_bad_images)
    assert data.bucket_counts() == {(128, 128): 3, (192, 128): 3}

    logs: list[str] = []
    trainer = LoraTrainer(cfg, preset, data, log=logs.append)
    assert any("caching pass on cpu" in line for line in logs)
    # The 2.1 VAE's unpatched tokens: one per 16x16 pixels, its 64 latent channels.
    assert trainer.inputs.latents[(192, 128)].shape == (3, 8 * 12, 64)
    assert trainer.checkpointing and type(trainer.transformer).__name__ == "QwenImage21Transformer2DModel"
    assert {p.dtype for p in trainer.params} == {torch.float32}
    before = {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if p.requires_grad}
    metrics = run_training(trainer)
    assert metrics["step"] == 2 and math.isfinite(metrics["final_loss"])
    assert all(n > 0 for n in trainer.bucket_draws.values()), trainer.bucket_draws
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.transformer.named_parameters()
               if p.requires_grad), "two optimizer steps moved the LoRA"

    registry, manifest = publish_trained(trainer, cfg, preset, data, metrics, tmp_path)
    assert (manifest.rank, manifest.base_model_id) == (32, "qwen-image-2.1-turbo")

    pipeline = LocalPipeline(preset)
    _, adapter_dir = fetch_for_preset(registry, manifest.ref, preset)  # the serving compatibility check
    spec = ImageGenerationRequest(prompt="lrzstyle, a red square, picture 1", size="192x128",
                                  seed=3).resolve(preset, 0)
    plain = np.asarray(pipeline.generate(spec)[0])
    styled = np.asarray(pipeline.generate(dataclasses.replace(spec, adapters=(AdapterUse(manifest.ref, 1.0),)),
                                          {manifest.ref: str(adapter_dir)})[0])
    assert plain.shape == styled.shape == (128, 192, 4)
    assert np.abs(styled.astype(int) - plain.astype(int)).max() > 0, "the adapter changes what is served"
    np.testing.assert_array_equal(np.asarray(pipeline.generate(spec)[0]), plain)

"""What the driver publishes after a run that completed every step: the adapter files out of the final checkpoint,
and the registry manifest fields."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lightray.config import ModelPreset
from lightray.training.config import TrainConfig
from lightray.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TRAINER_STATE = "trainer_state.json"
"""The checkpoint file `LoraTrainer.save_checkpoint` writes its step, metrics and base fingerprint to."""


def checkpoint_fingerprint(checkpoint_dir: str | Path) -> str:
    """The base fingerprint a checkpoint's worker computed (`LoraTrainer.base_fingerprint`)."""
    state = json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text())
    fingerprint = state.get("base_fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint.startswith("sha256:"):
        raise ValueError(f"checkpoint {checkpoint_dir} records no base fingerprint")
    return fingerprint


def manifest_fields(config: TrainConfig, preset: ModelPreset, base_fingerprint: str, data_hash: str,
                    metrics: dict[str, Any]) -> dict[str, Any]:
    """The `AdapterRegistry.publish` manifest fields of a finished run. `base_fingerprint` is the one the workers
    computed from the weight files they trained on (`checkpoint_fingerprint`): the driver never reads the model."""
    return {
        "base_model_id": preset.base_model_id,
        "base_fingerprint": base_fingerprint,
        "base_family": preset.family,
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

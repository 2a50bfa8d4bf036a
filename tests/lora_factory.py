"""Real, loadable tenant adapters for API tests, in a second rather than a training run: a peft LoRA on the
preset's transformer with seeded random weights, written in the trainer's file format (`LoraTrainer.save_adapter`)
and published to a registry. Different seeds give visibly different images."""

from __future__ import annotations

from pathlib import Path

import torch

from lightray.config import ModelPreset
from lightray.lora_training import ADAPTER_WEIGHTS
from lightray.registry import AdapterManifest, AdapterRegistry
from lightray.world.train import LORA_TARGETS


def write_random_lora(preset: ModelPreset, folder: Path, seed: int, rank: int = 4, strength: float = 0.05) -> Path:
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(preset.root / "transformer", torch_dtype=torch.float32)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    config = transformer.peft_config["default"]
    config.base_model_name_or_path = preset.base_model_id
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): give both matrices small random values
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * strength)
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer, save_embedding_layers=False).items()}
    folder.mkdir(parents=True, exist_ok=True)
    QwenImagePipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name=ADAPTER_WEIGHTS,
                                        transformer_lora_adapter_metadata=config.to_dict())
    config.save_pretrained(str(folder))
    return folder


def publish_random_lora(registry: AdapterRegistry, preset: ModelPreset, tenant: str, name: str, seed: int,
                        workdir: Path, **manifest_fields) -> AdapterManifest:
    src = write_random_lora(preset, workdir / f"{tenant}-{name}-{seed}", seed)
    return registry.publish(tenant, name, src, base_model_id=preset.base_model_id, **manifest_fields)

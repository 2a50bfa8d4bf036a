"""Adapters for tests and benchmarks: real LoRAs built for a preset's transformer, and placeholders that resolve
without torch, published to a local registry."""

from __future__ import annotations

from pathlib import Path


def make_lora_adapter(preset, dest, seed: int, rank: int = 4, std: float = 0.05,
                      targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "img_mlp.net.2")):
    """A real LoRA for `preset`'s transformer in the files the registry and `load_lora_weights` expect
    (`adapter_model.safetensors` + `adapter_config.json`), with seeded random A and B matrices (B = 0, peft's
    default, would be a no-op): different seeds give adapters that change the image differently."""
    from pathlib import Path

    import torch
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = QwenImageTransformer2DModel.from_pretrained(preset.root / "transformer", torch_dtype=torch.float32)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    config = transformer.peft_config["default"]
    config.base_model_name_or_path = preset.base_model_id
    state = {k: v.detach().contiguous() for k, v in
             get_peft_model_state_dict(transformer, save_embedding_layers=False).items()}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    QwenImagePipeline.save_lora_weights(dest, transformer_lora_layers=state, weight_name="adapter_model.safetensors",
                                        transformer_lora_adapter_metadata=config.to_dict())
    config.save_pretrained(str(dest))
    return dest


def publish_lora_adapter(registry_root, preset, tenant: str, name: str, seed: int, tmp_dir,
                         manifest: dict | None = None, **kwargs):
    """`make_lora_adapter` (`kwargs`: its options) published to the registry at `registry_root` as the next version
    of tenant/name, with extra `manifest` fields (e.g. {"visibility": "public"}); returns its manifest."""
    from lightray.registry_settings import open_registry

    src = make_lora_adapter(preset, Path(tmp_dir) / f"{tenant}-{name}-{seed}", seed, **kwargs)
    return open_registry(str(registry_root)).publish(tenant, name, src, base_model_id=preset.base_model_id,
                                                      base_family=preset.family, **(manifest or {}))


def publish_placeholder_adapter(registry_root, preset, tenant: str, name: str, tmp_dir, **manifest):
    """The preset's own Lightning LoRA published as the next version of tenant/name, with extra `manifest` fields
    (e.g. base_model_id="other/base"): a real, loadable adapter without building one (no torch), for tests that
    only resolve adapters. Every such adapter has the same weights: use `publish_lora_adapter` to tell them apart
    in images."""
    import json
    import shutil

    from lightray.registry_settings import open_registry

    lightning = next(v.lightning_lora for v in preset.variants if v.lightning_lora)
    src = Path(tmp_dir) / f"placeholder-{tenant}-{name}"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copy(preset.resolve(lightning), src / "adapter_model.safetensors")
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8, "peft_type": "LORA"}))
    return open_registry(str(registry_root)).publish(
        tenant, name, src, **{"base_model_id": preset.base_model_id, "base_family": preset.family, **manifest})

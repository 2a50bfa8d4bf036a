"""Configs are data with one truth: Serve YAMLs validate against Ray's own schema, fit the machine they are for,
and k8s/rayservice.yaml embeds configs/serve/gpu.yaml verbatim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from lightray.config import MODEL_PRESETS_DIR, load_preset

REPO = Path(__file__).resolve().parent.parent
SERVE_CONFIGS = sorted((REPO / "configs/serve").glob("*.yaml"))
STAGES = {"Ingress", "TextEncoder", "Denoiser", "VaeDecoder"}


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_validates_with_ray_schema(path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    # The default preset's stages under their own names, each extra preset's as `<stage>-<preset name>`; presets
    # of one model (fused per variant) share the first one's TextEncoder and VaeDecoder.
    from serve_app.app import stage_names

    presets = [load_preset(ref) for ref in [app.args["preset"], *app.args.get("extra_presets", [])]]
    expected = {"Ingress"} | {name for names in stage_names(presets) for name in names.values()}
    assert {d.name for d in app.deployments} == expected


def test_local_config_places_every_replica_on_two_cpus():
    app = yaml.safe_load((REPO / "configs/serve/local.yaml").read_text())["applications"][0]
    total = 0.0
    for dep in app["deployments"]:
        replicas = dep.get("autoscaling_config", {}).get("max_replicas", dep.get("num_replicas", 1))
        total += replicas * dep["ray_actor_options"]["num_cpus"]
    assert total <= 2.0, f"fully scaled-up graph needs {total} CPUs; a 2-CPU node would leave replicas PENDING"


def test_rayservice_embeds_gpu_serve_config_verbatim():
    spec = importlib.util.spec_from_file_location("render", REPO / "k8s/render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    on_disk = (REPO / "k8s/rayservice.yaml").read_text()
    assert on_disk == render.render(), "k8s/rayservice.yaml is stale: run `python k8s/render.py`"
    manifest = yaml.safe_load(on_disk)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert manifest["spec"]["serveConfigV2"] == (REPO / "configs/serve/gpu.yaml").read_text()


@pytest.mark.parametrize("path", sorted(MODEL_PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_model_presets_validate(path):
    preset = load_preset(str(path))
    assert preset.model_ids


def test_prompt_template_matches_diffusers():
    from diffusers import QwenImagePipeline

    from lightray.world.build import PROMPT_TEMPLATE

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE


def test_local_denoiser_autoscaling_can_reach_max_on_the_local_cluster():
    """What benchmarks/autoscale_demo.py demonstrates, as a config check: on the CPUs a local cluster gives Ray
    (`RayCluster().num_cpus`), the graph fits with the Denoiser at max_replicas, the Denoiser actually scales
    (min < max, per-replica target set) and the other stages are fixed, so only the Denoiser moves."""
    from testing.local_cluster import RayCluster

    from ray.serve.config import AutoscalingConfig

    raw = yaml.safe_load((REPO / "configs/serve/local.yaml").read_text())
    deps = {d["name"]: d for d in raw["applications"][0]["deployments"]}
    scaling = AutoscalingConfig(**deps["Denoiser"]["autoscaling_config"])  # Ray's own validation and defaults
    assert scaling.min_replicas < scaling.max_replicas and scaling.target_ongoing_requests
    assert scaling.upscale_delay_s < scaling.downscale_delay_s  # react fast, give back slowly (no flapping)
    for name in STAGES - {"Denoiser"}:
        assert "autoscaling_config" not in deps[name] and deps[name]["num_replicas"] >= 1, name
    need = sum(d["ray_actor_options"]["num_cpus"] * d.get("autoscaling_config", {}).get("max_replicas",
               d.get("num_replicas", 1)) for d in deps.values())
    cpus = RayCluster.__init__.__defaults__[0]
    assert need <= cpus, f"at max_replicas the graph needs {need} CPUs; the local cluster has {cpus}"

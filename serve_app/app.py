"""The Serve application: `serve run configs/serve/local.yaml` imports `serve_app.app:build_app`."""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from lightray.config import ModelPreset, load_preset
from serve_app.api import create_app
from serve_app.ray_backend import RayGraphBackend
from serve_app.settings import ServiceSettings


def stage_name(stage: str, preset: ModelPreset, index: int) -> str:
    """The deployment name of `stage` for the `index`-th served preset: the stage's own name for the default
    preset (what configs and dashboards have always called it), `<stage>-<preset name>` for the others."""
    return stage if index == 0 else f"{stage}-{preset.name}"


SHARED_STAGES = ("TextEncoder", "VaeDecoder")
"""Stages that presets differing only in how they sample the transformer share (`stage_names`)."""


def stage_sharing_key(preset: ModelPreset) -> str:
    """What a preset's TextEncoder and VaeDecoder depend on: everything but its name and the Denoiser's business
    (its variants, `fuse`, `quality_variants`). Fused presets of one model (one Denoiser deployment per variant)
    have equal keys and share one TextEncoder and one VaeDecoder."""
    import json

    return json.dumps(preset.model_dump(mode="json", exclude={"name", "variants", "fuse", "quality_variants"}),
                      sort_keys=True)


def stage_names(presets: list[ModelPreset]) -> list[dict[str, str]]:
    """Per served preset, the deployment name of each of its stages: its own Denoiser (`stage_name`), and the
    TextEncoder and VaeDecoder of the first preset with its `stage_sharing_key`."""
    first: dict[str, int] = {}
    names = []
    for index, preset in enumerate(presets):
        owner = first.setdefault(stage_sharing_key(preset), index)
        names.append({"Denoiser": stage_name("Denoiser", preset, index),
                      **{stage: stage_name(stage, presets[owner], owner) for stage in SHARED_STAGES}})
    return names


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, graphs: list[tuple[dict, object, object, object]], settings: dict):
        """`graphs`: per served preset, (preset, TextEncoder, Denoiser, VaeDecoder handles), the default first."""
        self.settings = ServiceSettings(**settings)
        self.backends = [RayGraphBackend(load_preset(preset), text_encoder, denoiser, vae)
                         for preset, text_encoder, denoiser, vae in graphs]

    def __serve_build_asgi_app__(self):
        app = create_app(self.backends, self.settings)
        app.state.request_id_echoed_by_proxy = True  # Serve's proxy returns x-request-id (serve_app/observability.py)
        return app


INGRESS_ONLY = ("auth_enabled", "api_keys")
"""Settings only the Ingress reads, and resolves from its own environment where the Serve YAML's args leave them out."""


def build_app(args: dict | None = None) -> Application:
    """Application builder; `args` are ServiceSettings fields (from the Serve YAML's `args`)."""
    # Imported here, not at the top: the Ingress replica imports this module and must not load the stages' torch
    # (it validates JSON and forwards handles; tests/test_configs.py checks it stays torch-free).
    from deployments import Denoiser, TextEncoder, VaeDecoder

    args = dict(args or {})
    # Serve runs this builder in a task on any node, and Kubernetes mounts the API keys only where the Ingress runs
    # (k8s/rayservice.yaml, docs/security.md). So the builder resolves the stages' settings with auth's check
    # left to the Ingress, and hands the Ingress its settings without `api_keys` (unless the YAML's args name
    # them): the Ingress replica reads LIGHTRAY_API_KEYS from its own environment and refuses to start without
    # them. The keys are then never in the deployment's init args, i.e. never in the Serve controller's state.
    settings = ServiceSettings(**{**args, "auth_enabled": False})
    ingress_settings = {**settings.model_dump(exclude=set(INGRESS_ONLY)),
                        **{k: args[k] for k in INGRESS_ONLY if k in args}}
    graphs = []
    presets = [load_preset(ref) for ref in [settings.preset, *settings.extra_presets]]
    bound: dict[str, object] = {}  # deployment name -> its bound deployment (shared stages are bound once)
    for preset, names in zip(presets, stage_names(presets)):
        dumped = preset.model_dump()
        if names["TextEncoder"] not in bound:
            bound[names["TextEncoder"]] = TextEncoder.options(name=names["TextEncoder"]).bind(dumped)
        if names["VaeDecoder"] not in bound:
            bound[names["VaeDecoder"]] = VaeDecoder.options(name=names["VaeDecoder"]).bind(
                dumped, stack_requests=settings.vae_stack_requests)
        graphs.append((
            dumped,
            bound[names["TextEncoder"]],
            Denoiser.options(name=names["Denoiser"]).bind(
                dumped, settings.registry, settings.registry_storage_options, settings.adapter_cache_size,
                settings.engine.model_dump(), registry_settings={
                    "registry_cache_ttl_s": settings.registry_cache_ttl_s,
                    "adapter_file_cache_bytes": settings.adapter_file_cache_bytes}),
            bound[names["VaeDecoder"]],
        ))
    return Ingress.bind(graphs, ingress_settings)

"""The Serve application: `serve run configs/serve/local.yaml` imports `serve_app.app:build_app`."""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from lightray.config import load_preset
from serve_app.api import create_app
from serve_app.backend import RayGraphBackend
from serve_app.settings import ServiceSettings


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, text_encoder, denoiser, vae, settings: dict):
        self.settings = ServiceSettings(**settings)
        preset = load_preset(self.settings.preset)
        self.backend = RayGraphBackend(preset, text_encoder, denoiser, vae)

    def __serve_build_asgi_app__(self):
        app = create_app(self.backend, self.settings)
        app.state.request_id_echoed_by_proxy = True  # Serve's proxy returns x-request-id (serve_app/observability.py)
        return app


def build_app(args: dict | None = None) -> Application:
    """Application builder; `args` are ServiceSettings fields (from the Serve YAML's `args`)."""
    # Imported here, not at the top: the Ingress replica imports this module and must not load the stages' torch
    # (it validates JSON and forwards handles; tests/test_configs.py checks it stays torch-free).
    from deployments import Denoiser, TextEncoder, VaeDecoder

    settings = ServiceSettings(**(args or {}))
    preset = load_preset(settings.preset).model_dump()
    return Ingress.bind(
        TextEncoder.bind(preset),
        Denoiser.bind(preset, settings.registry, settings.registry_storage_options, settings.adapter_cache_size,
                      settings.engine.model_dump()),
        VaeDecoder.bind(preset, stack_requests=settings.vae_stack_requests),
        settings.model_dump(),
    )

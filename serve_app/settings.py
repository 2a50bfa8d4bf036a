"""Service settings: defaults < Serve YAML `args` < environment (LIGHTRAY_*). Tests build their own."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIGHTRAY_", extra="forbid")

    preset: str | dict = "lightray-shapes"
    """Model preset: a name under configs/models/, a YAML path, or an inline preset."""
    registry: str = "./registry"
    """Adapter registry root: a local folder or s3://bucket/prefix."""
    registry_storage_options: dict = Field(default_factory=dict)
    """fsspec options for the registry (e.g. {"client_kwargs": {"endpoint_url": …}})."""
    adapter_cache_size: int = Field(4, ge=1)
    """Tenant adapters kept loaded per Denoiser replica (LRU)."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A generation still running after this long is abandoned with 504."""
    image_store_dir: str = "./out/images"
    """Where `response_format=url` images are kept (a shared folder when there are several ingress replicas)."""
    public_url: str | None = None
    """Base URL clients reach the service at, for image URLs; default: the request's own base URL."""
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    """Largest image (or mask) upload accepted by /v1/images/edits, in bytes."""
    max_image_pixels: int = Field(4096 * 4096, ge=256)
    """Largest input image accepted by /v1/images/edits, in pixels (checked before decoding; the output size is
    limited by the model preset)."""

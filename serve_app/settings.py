"""Service settings. Precedence, highest first (pydantic-settings' order; tests/test_configs.py checks it):

1. the Serve YAML's application `args` (`build_app` passes them to the constructor), or a test's keyword arguments;
2. the environment, `LIGHTRAY_<FIELD>` (nested values as JSON, e.g. LIGHTRAY_API_KEYS);
3. the defaults below.

Mappings and nested models (`registry_storage_options`, `engine`) are merged key by key across the sources, the
higher one winning per key. So an environment variable fills in what the YAML leaves out (secrets, in particular: LIGHTRAY_API_KEYS from a
Kubernetes Secret), and cannot override what the YAML sets.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from lightray.config import EngineConfig

from lightray.contracts import PRIORITIES, Priority
from lightray.registry import validate_tenant
from lightray.registry_settings import RegistrySettings


class ApiKey(BaseModel):
    """One API key and the tenant it acts as. Several keys may map to one tenant (rotation)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tenant: str
    """Tenant id, as used in adapter refs (`tenant/name`)."""
    key: SecretStr = Field(min_length=16)
    """The bearer token clients send (`Authorization: Bearer <key>`). Secret: never logged or echoed; prefer the
    LIGHTRAY_API_KEYS environment variable (a Kubernetes Secret) to writing keys into a config file."""
    priority: Priority = "interactive"
    """Scheduling class of this key's requests that name none (a request's `priority` field may ask for another, up
    to `max_priority`). Per key, so a tenant can hold an interactive key for its app and a batch key for bulk jobs."""
    max_priority: Priority | None = None
    """The most urgent class a request with this key may ask for in its `priority` field; asking for a more urgent
    one is 403 naming `priority`. None: the key's own `priority`, so a `batch` key cannot ask for `interactive`."""
    max_concurrent_requests: int | None = Field(None, ge=1)
    """Generations and edits this key's tenant may have in progress per ingress replica, counted over all the
    tenant's keys and checked against the calling key's bound; the next is answered 429 + Retry-After naming this
    bound (`serve_app/admission.py`). None: the service's `tenant_share` of its `max_concurrent_requests`."""
    max_admitted_work: float | None = Field(None, gt=0)
    """Work this key's tenant may have in progress per ingress replica, in the unit of the service's
    `max_admitted_work` (1024² transformer row-steps), counted like `max_concurrent_requests`; beyond it 429 +
    Retry-After naming this bound. None: the service's `tenant_share` of its `max_admitted_work` (no bound when the
    service sets none)."""

    @model_validator(mode="after")
    def _check_tenant(self) -> "ApiKey":
        validate_tenant(self.tenant)
        if self.max_priority is not None and PRIORITIES.index(self.max_priority) > PRIORITIES.index(self.priority):
            raise ValueError(f"max_priority: {self.max_priority!r} is less urgent than the key's own priority "
                             f"{self.priority!r}")
        return self

    @property
    def priority_ceiling(self) -> Priority:
        """The most urgent class this key may ask for (`max_priority`, or else its `priority`)."""
        return self.max_priority or self.priority


class ServiceSettings(RegistrySettings):
    """Every setting of the service; the registry's location and storage options come from `RegistrySettings`."""

    model_config = SettingsConfigDict(env_prefix="LIGHTRAY_", extra="forbid", use_attribute_docstrings=True)

    preset: str | dict = "lightray-shapes"
    """Model preset: a name under configs/models/, a YAML path, or an inline preset (`from_preset:` plus the keys it
    changes, `lightray.config.load_preset`). The default model: requests that name no `model` go to it (for an
    endpoint it does not serve, to the first of `extra_presets` that does)."""
    extra_presets: list[str | dict] = Field(default_factory=list)
    """More presets served beside `preset`, each by stage deployments of its own (named `<stage>-<preset name>`,
    e.g. `Denoiser-lightray-shapes-edit`); a request's `model` picks the preset. Model ids must not repeat. Presets
    of one model that differ only in their variants, `fuse` and `quality_variants` (one fused Denoiser per
    variant) share the first one's TextEncoder and VaeDecoder (`serve_app.app.stage_names`)."""
    adapter_cache_size: int = Field(4, ge=1)
    """Tenant adapters kept loaded per Denoiser replica (LRU)."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """Each Denoiser replica's step budget and queue bound (`lightray.config.EngineConfig`); keep the Denoiser's
    `max_ongoing_requests` at or below `engine.max_live_requests`."""
    vae_stack_requests: Literal["exact", "all"] = "exact"
    """Which concurrent decodes share a VAE call in the VaeDecoder (`lightray.stages.vae`): "exact" only where that
    is bit-identical to decoding each request alone (so a seed gives the same pixels whatever else runs); "all"
    every request of one size, for throughput, within the float tolerance docs/batching.md states."""
    request_timeout_s: float = Field(120.0, gt=0)
    """A generation still running after this long is abandoned with 504."""
    image_store_dir: str = "./out/images"
    """Where `response_format=url` images are kept (a shared folder when there are several ingress replicas)."""
    image_store_max_files: int = Field(2000, ge=1)
    """Images the store keeps after each sweep; past it the oldest image of the tenant holding the most is evicted
    (`serve_app/image_store.py`), so one tenant's burst evicts its own images first."""
    image_store_sweep_interval_s: float = Field(60.0, gt=0)
    """How often the image store expires and evicts images (it also sweeps when the ingress stores its first)."""
    public_url: str | None = None
    """Base URL clients reach the service at, for image URLs; default: the request's own base URL."""
    max_json_body_bytes: int = Field(256 * 1024, ge=4096)
    """Largest body of any route but the edits, in bytes (a prompt is at most a few KB): a longer one is answered
    413 before it is parsed (`serve_app.body_limits`)."""
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    """Largest image (or mask) upload accepted by /v1/images/edits, in bytes."""
    max_image_pixels: int = Field(4096 * 4096, ge=256)
    """Largest input image accepted by /v1/images/edits, in pixels (checked before decoding; the output size is
    limited by the model preset)."""
    max_request_image_pixels: int = Field(24 * 1024 * 1024, ge=256)
    """Pixels one edit may have decoded, every upload counted (image and mask, or an instruction edit's 1-3
    pictures), in pixels. Decided from the uploads' headers before any is decoded: past it the request is a 400
    naming the upload (`image`, `mask`, `image[i]`) that crossed it (a 75 KB PNG can declare 4096², and decoding
    one with its mask took 0.94 s of CPU and 337 MB). The default takes a 12 Mpx photo and its mask; decoding is
    charged to `max_admitted_work` too (`serve_app.admission.pixel_work`)."""
    max_concurrent_requests: int = Field(32, ge=1)
    """Generations and edits in progress per ingress replica; the next one is answered 503 + Retry-After at once
    (serve_app/admission.py says why the stage queues alone do not bound a burst)."""
    max_admitted_work: float | None = Field(None, gt=0)
    """Work in progress per ingress replica, in 1024² transformer row-steps (`serve_app.admission.request_work`:
    steps × images × 2 with true CFG × pixels / 1024²); a request that does not fit is answered 503 + Retry-After
    at once. Size it so what every ingress admits drains within the request timeout (docs/capacity.md). None: only
    `max_concurrent_requests` bounds admission (small CPU configs, where requests are alike)."""
    auth_enabled: bool = True
    """Require an API key on every /v1 route (401 without one) and scope adapters to the key's tenant. On by
    default; only configs/serve/local.yaml (one user, loopback) turns it off, and then every adapter is usable."""
    local_hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"])
    """With auth off, the only Host header names (any port) the service answers; any other is a 421. A page on
    another site that rebinds its DNS name to 127.0.0.1 then cannot use the local, keyless service
    (`serve_app/local_only.py`). Not checked with auth on, where the API keys guard the routes."""
    api_keys: list[ApiKey] = Field(default_factory=list)
    """Keys and their tenants, e.g. LIGHTRAY_API_KEYS='[{"tenant": "acme", "key": "…", "priority": "batch"}]'."""
    tenant_share: float = Field(0.5, gt=0, le=1)
    """Share of each ingress bound (`max_concurrent_requests`, `max_admitted_work`) that one tenant may hold when
    its key sets no bound of its own (rounded up, at least one request): one tenant's burst then leaves the rest of
    the ingress to the others. Not applied with auth off, where the single local user is the only tenant."""
    default_priority: Priority = "interactive"
    """Scheduling class of requests that name none when auth is off (with auth on, each key's `priority`)."""

    @model_validator(mode="after")
    def _check_auth(self) -> "ServiceSettings":
        if self.auth_enabled and not self.api_keys:
            raise ValueError("api_keys: auth_enabled is on but no API keys are configured; set LIGHTRAY_API_KEYS "
                             "(JSON list of {tenant, key}) or auth_enabled: false for a local single-user service")
        return self

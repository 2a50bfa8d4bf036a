"""Where the adapter registry is and how to reach it: the one place its location and storage options are read.

Every process that opens the registry (the ingress, Denoiser replicas, the `lightray` CLI, the training job, the
tests) goes through `RegistrySettings.open`, so `./registry` means the same folder in all of them.

Precedence, highest first (pydantic-settings' order, tested in tests/test_configs.py):

1. values passed to the constructor: a command-line flag, a Serve YAML `args` entry, a training config field;
2. the environment: `LIGHTRAY_REGISTRY`, `LIGHTRAY_REGISTRY_STORAGE_OPTIONS` (JSON);
3. the defaults below.

Mappings (`registry_storage_options`) are merged key by key across the sources, the higher one winning per key:
an empty mapping passed to the constructor does not clear what the environment sets.

A relative local root is taken from the repository root, never from the working directory: Serve replicas and
Ray jobs run with working directories of Ray's choosing, and the CLI must find the folder the service uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from lightray.config import REPO_ROOT
from lightray.registry import AdapterRegistry, ManifestCache

ENV_REGISTRY = "LIGHTRAY_REGISTRY"
"""Environment variable naming the registry root."""
ENV_STORAGE_OPTIONS = "LIGHTRAY_REGISTRY_STORAGE_OPTIONS"
"""Environment variable holding the fsspec storage options as JSON (keeps credentials off command lines)."""
DEFAULT_REGISTRY = "./registry"
"""The registry root when nothing names one: `registry/` in the repository."""


def resolve_registry_root(root: str) -> str:
    """`root` with a relative local path made absolute against the repository root; URLs and absolute paths as
    given."""
    if "://" in root or Path(root).is_absolute():
        return root
    return str(REPO_ROOT / root)


class RegistrySettings(BaseSettings):
    """The registry's location and storage options (module docstring: precedence and the meaning of a relative
    path). `serve_app.settings.ServiceSettings` extends it, so the service reads the same fields the same way."""

    model_config = SettingsConfigDict(env_prefix="LIGHTRAY_", extra="forbid", use_attribute_docstrings=True)

    registry: str = DEFAULT_REGISTRY
    """Adapter registry root: a local folder (relative: to the repository root) or s3://bucket/prefix. Environment:
    LIGHTRAY_REGISTRY."""
    registry_storage_options: dict[str, Any] = Field(default_factory=dict)
    """fsspec options for the registry (e.g. {"client_kwargs": {"endpoint_url": …}}). Environment:
    LIGHTRAY_REGISTRY_STORAGE_OPTIONS (JSON); for S3 the usual AWS_* variables work too."""
    registry_cache_ttl_s: float = Field(2.0, ge=0)
    """Seconds an answer about a manifest is re-used before the store is read again (`ManifestCache`): a pinned
    version, a `latest`, a ref that does not exist, and the whole listing `GET /v1/adapters` pages through. A
    version published or deleted through another process (the CLI, a training job, another ingress) is used, or
    refused, within this long; 0: at once, at the cost of a store read per lookup. Environment:
    LIGHTRAY_REGISTRY_CACHE_TTL_S."""
    adapter_file_cache_bytes: int | None = Field(20 * 1024**3, ge=0)
    """Bound on the local cache of downloaded adapter files (per machine and registry, shared by the processes
    there), in bytes: after each download the least recently used versions no process is using are removed until
    the cache fits (`lightray.adapter_files`). Versions in use stay, so the cache may exceed the bound while they
    are held. None: unbounded. Environment: LIGHTRAY_ADAPTER_FILE_CACHE_BYTES."""

    @property
    def registry_root(self) -> str:
        """`registry` resolved (`resolve_registry_root`)."""
        return resolve_registry_root(self.registry)

    def open_registry(self, **kwargs: Any) -> AdapterRegistry:
        """The registry these settings name, caching manifests as `registry_cache_ttl_s` says and bounding its
        file cache at `adapter_file_cache_bytes`; `kwargs` go to `AdapterRegistry` (e.g. `cache_dir`)."""
        return AdapterRegistry(self.registry_root, storage_options=self.registry_storage_options or None,
                               manifest_cache=ManifestCache(ttl_s=self.registry_cache_ttl_s),
                               cache_max_bytes=self.adapter_file_cache_bytes, **kwargs)


def open_registry(root: str | None = None, storage_options: dict[str, Any] | None = None,
                  **settings: Any) -> AdapterRegistry:
    """The registry at `root` with `storage_options`; either left None, and any other `RegistrySettings` field not
    in `settings`, is read from the environment, then the default (`RegistrySettings`)."""
    explicit: dict[str, Any] = dict(settings)
    if root is not None:
        explicit["registry"] = root
    if storage_options is not None:
        explicit["registry_storage_options"] = storage_options
    return RegistrySettings(**explicit).open_registry()

"""Tenant adapters at request time: parse the API's `lora` field, resolve it against the registry, check the
adapter was trained for the served base model. Used by the ingress (before any replica work) and by every
process that loads adapters (Denoiser replicas, the in-process pipeline).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lightray.config import REPO_ROOT, ModelPreset
from lightray.registry import (
    AdapterIncompatible,
    AdapterManifest,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    InvalidAdapterRef,
    check_compatible,
)
from lightray.schemas import RequestError

_SCALE = re.compile(r"^(?P<ref>[^:]+)(?::(?P<scale>-?[0-9]*\.?[0-9]+))?$")
MAX_ADAPTER_SCALE = 4.0


@dataclasses.dataclass(frozen=True)
class ResolvedAdapter:
    ref: str
    """Concrete `tenant/name@vN` (a `latest` request is pinned here, so a newly published version is a new id
    and is loaded fresh, never served from a stale cache)."""
    scale: float
    manifest: AdapterManifest


def open_registry(root: str, storage_options: dict | None = None) -> AdapterRegistry:
    """The registry at `root`; a relative local path is taken from the repository root, so every process (CLI,
    replica, job) agrees on it whatever its working directory."""
    if "://" not in root and not Path(root).is_absolute():
        root = str(REPO_ROOT / root)
    return AdapterRegistry(root, storage_options=storage_options or None)


def can_use(manifest: AdapterManifest, tenant: str | None) -> bool:
    """Whether `tenant` may see and generate with an adapter: its own, or another tenant's public one.
    `tenant` None: no tenancy (a single-user service), everything is usable."""
    return tenant is None or manifest.tenant == tenant or manifest.visibility == "public"


def can_delete(manifest: AdapterManifest, tenant: str | None) -> bool:
    """Only the owner deletes (public adapters included)."""
    return tenant is None or manifest.tenant == tenant


def parse_lora_field(value: str) -> tuple[str, float]:
    """'tenant/name[@version][:scale]' → (ref, scale)."""
    m = _SCALE.match(value.strip())
    if not m:
        raise RequestError("lora", f"lora must look like 'tenant/name[@version][:scale]', got {value!r}")
    scale = float(m.group("scale")) if m.group("scale") else 1.0
    if not -MAX_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE:
        raise RequestError("lora", f"lora scale must be within ±{MAX_ADAPTER_SCALE:g}, got {scale:g}")
    return m.group("ref"), scale


def resolve_adapter(registry: AdapterRegistry, preset: ModelPreset, value: str,
                    tenant: str | None = None) -> ResolvedAdapter:
    """The request's `lora` field against the registry: 400 malformed, 404 unknown (or another tenant's private
    adapter: indistinguishable, so ids cannot be probed), 422 wrong base model."""
    ref, scale = parse_lora_field(value)
    manifest = find_adapter(registry, ref, tenant, param="lora")
    try:
        check_compatible(manifest, preset.base_model_id, None)
    except AdapterIncompatible as err:
        raise RequestError("lora", f"lora: {err}", status=422, code="adapter_incompatible") from None
    return ResolvedAdapter(ref=manifest.ref, scale=scale, manifest=manifest)


def find_adapter(registry: AdapterRegistry, ref: str, tenant: str | None, param: str) -> AdapterManifest:
    """The manifest `ref` names, if `tenant` may see it: 400 malformed, 404 unknown or not visible to `tenant`."""
    try:
        manifest = registry.resolve(AdapterRef.parse(ref))
    except InvalidAdapterRef as err:
        raise RequestError(param, f"{param}: {err}") from None
    except AdapterNotFound:
        manifest = None
    if manifest is None or not can_use(manifest, tenant):
        raise RequestError(param, f"adapter {ref!r} does not exist", status=404, code="adapter_not_found")
    return manifest

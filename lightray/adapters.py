"""Tenant adapters at request time: resolve the adapters of a request's `lora` field (parsed by
`lightray.schemas.parse_lora_field`) against the registry as the caller's tenant sees them, pin each to a concrete
version, check each was trained for the served base model (`pin_adapters`: the ingress, before any replica work,
and the CLI's in-process mode). Every process that loads adapters (Denoiser replicas, the in-process pipeline)
checks them out here too.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from lightray.adapter_files import HeldFiles
from lightray.config import ModelPreset
from lightray.contracts import AdapterUse
from lightray.errors import Incompatible, NotFound, RequestError
from lightray.fingerprint import fingerprint_model
from lightray.models import FAMILIES
from lightray.registry import (
    AdapterCorrupt,
    AdapterIncompatible,
    AdapterManifest,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    InvalidAdapterRef,
    check_compatible,
)
from lightray.schemas import GenerationSpec

logger = logging.getLogger(__name__)

Spec = TypeVar("Spec", bound=GenerationSpec)


@dataclasses.dataclass(frozen=True)
class ResolvedAdapter:
    ref: str
    """Concrete `tenant/name@vN` (a `latest` request is pinned here, so a newly published version is a new id
    and is loaded fresh, never served from a stale cache)."""
    scale: float
    manifest: AdapterManifest

    @property
    def use(self) -> AdapterUse:
        """What a spec carries for this adapter (pinned ref, its manifest's checksum, and scale)."""
        return AdapterUse(ref=self.ref, scale=self.scale, checksum=self.manifest.checksum)


def checkout_for_preset(registry: AdapterRegistry, use: AdapterUse, preset: ModelPreset
                        ) -> tuple[AdapterManifest, HeldFiles]:
    """Download (or re-use the verified cached copy of) a pinned adapter to load into `preset`'s transformer, held
    in the local file cache until released: refused unless it fits this model (`check_fits`, with this process's
    weights' fingerprint, `lightray.fingerprint`); `AdapterNotFound` when `use.checksum` is set and the
    registry's manifest for `use.ref` is another (the version was deleted, and something else stands under its
    ref). Every process that loads adapters uses it."""
    manifest, held = registry.checkout(use.ref)
    try:
        check_fits(manifest, preset, fingerprint_model(preset))
        if use.checksum and manifest.checksum != use.checksum:
            raise AdapterNotFound(f"adapter {use.ref} is no longer the version that was pinned (its manifest "
                                  "changed)")
    except BaseException:
        held.release()
        raise
    return manifest, held


class AdapterOfAnotherFamily(AdapterIncompatible):
    """The adapter is for another model family's transformer: its layers do not exist in this one."""


def check_fits(manifest: AdapterManifest, preset: ModelPreset, base_fingerprint: str | None = None) -> None:
    """Raise unless `manifest`'s adapter can be applied to `preset`'s transformer:
    `AdapterOfAnotherFamily` when it records a family whose transformer is another class (it cannot load at all);
    `AdapterIncompatible` when it was trained for another base (neither `base_model_id` nor one of
    `adapter_base_model_ids`), or for this base with other weights (`base_fingerprint`, compared when both sides
    know one: `lightray.registry.check_compatible`)."""
    family = FAMILIES.get(manifest.base_family)
    served = preset.model_family
    if family is not None and family.transformer_class != served.transformer_class:
        raise AdapterOfAnotherFamily(
            f"{manifest.ref} is an adapter for the {family.name} family ({family.transformer_class}); "
            f"model {preset.name!r} is {served.name} ({served.transformer_class})")
    if manifest.base_model_id in preset.adapter_base_model_ids:
        return
    check_compatible(manifest, preset.base_model_id, base_fingerprint)


def fetch_for_preset(registry: AdapterRegistry, ref: str, preset: ModelPreset) -> tuple[AdapterManifest, Path]:
    """`checkout_for_preset` for a caller that uses the files at once and does not hold them."""
    manifest, held = checkout_for_preset(registry, AdapterUse(ref), preset)
    held.release()
    return manifest, held.path


def can_use(manifest: AdapterManifest, tenant: str | None) -> bool:
    """Whether `tenant` may see and generate with an adapter: its own, or another tenant's public one.
    `tenant` None: no tenancy (a single-user service), everything is usable."""
    return tenant is None or manifest.tenant == tenant or manifest.visibility == "public"


def can_delete(manifest: AdapterManifest, tenant: str | None) -> bool:
    """Only the owner deletes (public adapters included)."""
    return tenant is None or manifest.tenant == tenant


def pin_adapters(spec: Spec, registry: AdapterRegistry, preset: ModelPreset, params: Sequence[str]) -> Spec:
    """`spec` with its adapters resolved against the registry as its tenant sees them (`resolve_adapters`: the
    refusals name the request's entry, `params[i]`) and each pinned to a concrete `tenant/name@vN` and its manifest's
    checksum, in order: a new spec (the core request is frozen). Blocking (registry reads)."""
    if not spec.adapters:
        return spec
    resolved = resolve_adapters(registry, preset, spec.adapters, params, spec.tenant)
    return dataclasses.replace(spec, adapters=tuple(adapter.use for adapter in resolved))


def resolve_adapters(registry: AdapterRegistry, preset: ModelPreset, adapters: Sequence[AdapterUse],
                     params: Sequence[str], tenant: str | None = None) -> tuple[ResolvedAdapter, ...]:
    """A request's adapters (refs as written, e.g. `acme/style` for the latest) against the registry as `tenant`
    sees it, in order: 404 unknown (or another tenant's private adapter: indistinguishable, so ids cannot be
    probed), 400 an adapter of another family's transformer, 422 another base model. `params`: the request field
    each adapter came from, named in the errors (`ImageGenerationRequest.lora_params`: "lora", or "lora[i]" for a
    list's entries)."""
    if len(params) != len(adapters):
        raise ValueError(f"{len(params)} params for {len(adapters)} adapters")
    resolved = []
    for adapter, param in zip(adapters, params):
        manifest = find_adapter(registry, adapter.ref, tenant, param=param)
        try:
            check_fits(manifest, preset)
        except AdapterOfAnotherFamily as err:
            raise RequestError(param, f"{param}: {err}", code="adapter_wrong_family") from None
        except AdapterIncompatible as err:
            raise Incompatible(param, f"{param}: {err}", code="adapter_incompatible") from None
        resolved.append(ResolvedAdapter(ref=manifest.ref, scale=adapter.scale, manifest=manifest))
    return tuple(resolved)


def find_adapter(registry: AdapterRegistry, ref: str, tenant: str | None, param: str) -> AdapterManifest:
    """The manifest `ref` names, if `tenant` may see it: 400 malformed, 404 unknown or not visible to `tenant`."""
    try:
        manifest = registry.resolve(AdapterRef.parse(ref))
    except InvalidAdapterRef as err:
        raise RequestError(param, f"{param}: {err}") from None
    except AdapterNotFound:
        manifest = None
    except AdapterCorrupt:
        # The registry's copy is damaged, so whether `tenant` may see it is unknown: its owner (or, with auth off,
        # the one local user) learns it is damaged (422); anyone else gets the 404 of an adapter that is not
        # theirs. The manifest's path and contents stay in the log.
        logger.warning("adapter %s: corrupt manifest in the registry", ref, exc_info=True)
        if tenant is not None and ref.split("/", 1)[0] != tenant:
            raise NotFound(param, f"adapter {ref!r} does not exist", code="adapter_not_found") from None
        raise Incompatible(param, f"adapter {ref!r} cannot be used: its registry entry is damaged (republish it)",
                           code="adapter_corrupt") from None
    if manifest is None or not can_use(manifest, tenant):
        raise NotFound(param, f"adapter {ref!r} does not exist", code="adapter_not_found")
    return manifest

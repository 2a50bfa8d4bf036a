"""`/v1/adapters`: the tenant's view of the adapter registry: list, show, delete. Publishing is the trainer's job
(`jobs/train_lora.py`) or `lightray adapters push`. A tenant sees its own adapters and every public one; another
tenant's private adapter does not exist for it (404), and only the owner may delete (403 on someone else's public
adapter)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query

from lightray.adapters import can_delete, can_use, find_adapter
from lightray.errors import NotFound, RequestError
from lightray.registry import (
    AdapterManifest,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    InvalidAdapterRef,
    latest_versions,
)
from serve_app.admission import Admission
from serve_app.auth import Principal
from serve_app.dependencies import admitted, get_principal, get_registry
from serve_app.errors import Forbidden
from serve_app.openapi_errors import error_responses
from serve_app.responses import AdapterDeleted, AdapterInfo, AdapterList

router = APIRouter(prefix="/v1", tags=["adapters"], responses=error_responses(400, 401))


def _ref(tenant: str, name: str, version: int | None) -> str:
    return f"{tenant}/{name}" + (f"@v{version}" if version is not None else "")


MAX_PAGE = 100
"""Most adapters one `GET /v1/adapters` page holds."""


@router.get("/adapters", response_model=AdapterList, responses=error_responses(503))
async def list_adapters(
    tenant: str | None = Query(None, description="Only this tenant's adapters."),
    all_versions: bool = Query(False, description="Every version, not just the latest of each adapter."),
    limit: int = Query(20, ge=1, le=MAX_PAGE, description=f"Adapters per page, 1 to {MAX_PAGE}."),
    after: str | None = Query(None, description="A page's `last_id`: the page after it (ids are in order of "
                                                "tenant, name, version)."),
    registry: AdapterRegistry = Depends(get_registry),
    principal: Principal = Depends(get_principal),
    admission: Admission = Depends(admitted),
) -> AdapterList:
    """The adapters the caller may use, its own and every public one, a page at a time: `has_more` says whether
    another page follows, and `after=<last_id>` asks for it. Admitted like a generation (503 when the ingress is
    full); the registry is listed at most once per `registry_cache_ttl_s` and every caller pages that listing."""
    start = None
    if after is not None:
        try:
            start = _order(AdapterRef.parse(after))
        except InvalidAdapterRef as err:
            raise RequestError("after", f"after: {err}") from None
    catalog = await asyncio.to_thread(registry.catalog)
    visible = [m for m in (catalog if all_versions else latest_versions(catalog))
               if can_use(m, principal.tenant) and (tenant is None or m.tenant == tenant)
               and (start is None or _order(m) > start)]
    page = visible[:limit]
    return AdapterList(data=[AdapterInfo.of(m) for m in page], has_more=len(visible) > limit,
                       first_id=page[0].ref if page else None, last_id=page[-1].ref if page else None)


def _order(ref: AdapterRef | AdapterManifest) -> tuple[str, str, int]:
    """Where an adapter id falls in the listing's order (tenant, name, version; a versionless `after` is before
    the adapter's first version)."""
    return ref.tenant, ref.name, ref.version or 0


@router.get("/adapters/{tenant}/{name}", response_model=AdapterInfo, responses=error_responses(404))
async def get_adapter(
    tenant: str,
    name: str,
    version: int | None = Query(None, ge=1, description="A version number; default: the latest."),
    registry: AdapterRegistry = Depends(get_registry),
    principal: Principal = Depends(get_principal),
) -> AdapterInfo:
    manifest = await asyncio.to_thread(find_adapter, registry, _ref(tenant, name, version), principal.tenant, "name")
    return AdapterInfo.of(manifest)


@router.delete("/adapters/{tenant}/{name}", response_model=AdapterDeleted, responses=error_responses(403, 404))
async def delete_adapter(
    tenant: str,
    name: str,
    version: int | None = Query(None, ge=1, description="Delete only this version; default: every version."),
    registry: AdapterRegistry = Depends(get_registry),
    principal: Principal = Depends(get_principal),
) -> AdapterDeleted:
    """Only the owning tenant deletes, so a key is needed: with auth off (no keys) this is 403, and the local user
    deletes with `lightray adapters delete`. Replicas that hold the adapter keep it until evicted, but no new
    request can name it once this returns."""
    if principal.tenant is None:
        raise Forbidden("authorization", "deleting an adapter over HTTP needs an API key, and this service has "
                        "none (auth is off); use `lightray adapters delete` on the registry", code="forbidden")
    ref = _ref(tenant, name, version)
    manifest = await asyncio.to_thread(find_adapter, registry, ref, principal.tenant, "name")
    if not can_delete(manifest, principal.tenant):
        raise Forbidden("name", f"adapter {ref!r} belongs to tenant {manifest.tenant!r}; only it may delete it",
                        code="forbidden")
    try:
        deleted = await asyncio.to_thread(registry.delete, ref)
    except AdapterNotFound:  # deleted concurrently
        raise NotFound("name", f"adapter {ref!r} does not exist", code="adapter_not_found") from None
    return AdapterDeleted(deleted=deleted)

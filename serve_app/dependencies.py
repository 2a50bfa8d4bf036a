"""FastAPI dependencies: everything a router needs comes from app.state, set by `create_app`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lightray.registry import AdapterRegistry
from serve_app.admission import Admission
from serve_app.auth import Principal
from serve_app.image_store import ImageStore
from serve_app.served_models import ServedModels
from serve_app.settings import ServiceSettings


def get_models(request: Request) -> ServedModels:
    return request.app.state.models


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


def get_image_store(request: Request) -> ImageStore:
    return request.app.state.image_store


# auto_error=False: a missing key is answered by ApiKeyAuth (401 in the service's error format, or no check at all
# when auth is off); the scheme also puts "Authorize" in /docs and the bearer scheme in the OpenAPI schema.
_bearer = HTTPBearer(auto_error=False, description="An API key from LIGHTRAY_API_KEYS (off in the local config).")


def get_principal(request: Request,
                  credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    return request.app.state.auth.authenticate(credentials.credentials if credentials else None, request)


async def admitted(request: Request, principal: Principal = Depends(get_principal)) -> AsyncIterator[Admission]:
    """Holds one of the ingress's generation slots for the request's lifetime (429 when the caller's tenant is at
    its own bound, 503 when the ingress has none free), before the body is read; the route charges the request's
    work to it once the spec is resolved. Async, so the counts are kept on the event loop without a lock."""
    with request.app.state.admission.slot(principal.quota) as admission:
        yield admission

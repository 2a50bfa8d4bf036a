"""The FastAPI application, independent of Ray: `create_app(backends, settings)`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lightray.errors import RequestError
from serve_app.admission import AdmissionLimit
from serve_app.auth import ApiKeyAuth
from serve_app.backend import GenerationBackend
from serve_app.errors import ServiceUnavailable, TenantOverQuota, error_type
from serve_app.body_limits import BodyLimitMiddleware
from serve_app.local_only import LocalOnlyMiddleware
from serve_app.security_headers import SecurityHeadersMiddleware
from serve_app.served_models import ServedModels
from serve_app.image_store import ImageStore
from serve_app.openapi_errors import error_response, error_responses, request_error_response, tidy_openapi
from serve_app.observability import REQUEST_ID_HEADER, RequestIdMiddleware, echoes_request_id, request_id_of
from serve_app.routers import adapters, edits, health, images, models, playground
from serve_app.settings import ServiceSettings

logger = logging.getLogger("lightray.api")


def _field_of(loc: tuple) -> str | None:
    """A pydantic error location as an error `param`: fields joined by ".", list indices as "[i]" ("seeds[1]")."""
    param = ""
    for part in loc:
        if part in ("body", "query", "path"):
            continue
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    return param or None


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # A field validator that checks a list's entries itself says which one in its error's context ("lora[1]"):
    # its location is the field's, and pydantic has no way to point deeper from there.
    param = (first.get("ctx") or {}).get("param") or _field_of(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if param is None and ":" in msg:  # model-level checks name their field first ("seeds: …")
        param = msg.split(":", 1)[0].strip() or None
    message = f"{param}: {msg}" if param and not msg.startswith(param) else msg
    return error_response(400, message, param, "invalid_value")


async def _on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's and FastAPI's own errors (an unparsable body, an unknown route, a wrong method) in OpenAI's
    error shape too, not FastAPI's `{"detail": …}`."""
    response = error_response(exc.status_code, str(exc.detail), None, None, error_type(exc.status_code))
    response.headers.update(exc.headers or {})
    return response


async def _on_request_error(request: Request, exc: RequestError) -> JSONResponse:
    return request_error_response(exc)


async def _on_over_quota(request: Request, exc: TenantOverQuota) -> JSONResponse:
    response = request_error_response(exc)
    response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _on_unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    response = error_response(503, str(exc), None, "unavailable", "server_error")
    response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = request_id_of(request)
    logger.exception("unhandled error on %s (request_id=%s)", request.url.path, request_id)
    response = error_response(500, f"internal error; see the service logs (request id {request_id})", None,
                              "internal_error", "server_error")
    if echoes_request_id(request):  # this handler answers outside the middlewares (Starlette's error middleware)
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


def create_app(backends: GenerationBackend | Sequence[GenerationBackend], settings: ServiceSettings) -> FastAPI:
    """The app over one backend per served model preset (`ServedModels`; the first is the default)."""
    app = FastAPI(
        title="Lightray",
        version="0.1.0",
        description="OpenAI-compatible image generation on Ray Serve (Qwen-Image-class models).",
        responses=error_responses(500),
        # Swagger UI loads its script from a CDN without SRI: not on an origin whose playground holds API keys
        # (serve_app/security_headers.py). /openapi.json is always served.
        docs_url=None if settings.auth_enabled else "/docs",
        redoc_url=None if settings.auth_enabled else "/redoc",
    )
    default_openapi = app.openapi
    app.openapi = lambda: app.openapi_schema or tidy_openapi(default_openapi(), settings.auth_enabled)
    app.state.models = ServedModels([backends] if not isinstance(backends, Sequence) else backends)
    app.state.settings = settings
    app.state.image_store = ImageStore(settings.image_store_dir, max_files=settings.image_store_max_files,
                                       sweep_interval_s=settings.image_store_sweep_interval_s)
    app.state.registry = settings.open_registry()
    app.state.auth = ApiKeyAuth(settings)
    app.state.admission = AdmissionLimit(settings.max_concurrent_requests, settings.max_admitted_work)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(RequestError, _on_request_error)
    app.add_exception_handler(TenantOverQuota, _on_over_quota)
    app.add_exception_handler(HTTPException, _on_http_exception)
    app.add_exception_handler(ServiceUnavailable, _on_unavailable)
    app.add_exception_handler(Exception, _on_unexpected)
    # Added first, so it runs inside the request-id middleware: its early 401 / 413 answers carry the id too.
    app.add_middleware(BodyLimitMiddleware, settings=settings, auth=app.state.auth)
    if not settings.auth_enabled:
        app.add_middleware(LocalOnlyMiddleware, hosts=settings.local_hosts)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.include_router(images.router)
    app.include_router(edits.router)
    app.include_router(models.router)
    app.include_router(adapters.router)
    app.include_router(health.router)
    app.include_router(playground.router)
    return app

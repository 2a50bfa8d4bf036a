"""The error responses each route declares in the OpenAPI schema: OpenAI's error shape (`ErrorResponse`) under
the status codes the route can answer with, so clients (and schema fuzzers) know every response they may get; and
the one builder of those responses (`error_response`, `request_error_response`) for the app's handlers and its
middlewares.

FastAPI would otherwise declare only its own 422 `HTTPValidationError`, which this service never sends: request
validation errors are answered with 400 in OpenAI's shape (`serve_app.api`). `tidy_openapi` drops those 422
entries and declares the `x-request-id` header on every response.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from lightray.errors import RequestError
from serve_app.errors import Unauthenticated, error_type, http_status
from serve_app.responses import ErrorBody, ErrorResponse

_DESCRIPTIONS = {
    400: "Invalid request; `error.param` names the field.",
    401: "Missing or invalid API key.",
    403: "The API key may not do this.",
    404: "Unknown model, adapter or resource.",
    413: "Request body or image too large.",
    415: "Unsupported content type.",
    422: "Adapter trained for another base model.",
    429: "The API key's tenant is at its own bound (`error.param` names it); retry after `Retry-After` seconds.",
    500: "Internal error (a bug); the message gives the request id to look up in the service logs.",
    503: "At capacity or a stage is unavailable; retry after `Retry-After` seconds.",
    504: "The generation did not finish within the request timeout.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route (or router) that can answer with these error statuses."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code],
                   **({"headers": _RETRY_AFTER} if code in (429, 503) else {})} for code in codes}


REQUEST_ID_HEADER_SCHEMA = {
    "required": True,
    "description": "The request's id: the client's `X-Request-Id` if it sent one; it is in every log line the "
                   "request caused.",
    "schema": {"type": "string"},
}


def tidy_openapi(schema: dict[str, Any], auth_enabled: bool = True) -> dict[str, Any]:
    """Drop FastAPI's default 422 `HTTPValidationError` responses (never sent here) and their component schemas;
    declare the `x-request-id` header on every response. With auth off, drop the bearer scheme and the 401s too:
    the schema describes the service as configured, so clients (and fuzzers) do not expect keys it ignores."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.get("responses", {})
            if not auth_enabled:
                operation.pop("security", None)
                responses.pop("401", None)
            default_422 = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if default_422.get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            for response in responses.values():
                response.setdefault("headers", {})["x-request-id"] = REQUEST_ID_HEADER_SCHEMA
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    if not auth_enabled:
        schema.get("components", {}).pop("securitySchemes", None)
    return schema


def error_response(status: int, message: str, param: str | None, code: str | None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    """An error in OpenAI's shape (`{"error": {message, type, param, code}}`) with its status."""
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def request_error_response(exc: RequestError) -> JSONResponse:
    """A `RequestError` in OpenAI's error shape: what every route and middleware answers for one."""
    status = http_status(exc)
    response = error_response(status, exc.message, exc.param, exc.code, error_type(status))
    if isinstance(exc, Unauthenticated):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response

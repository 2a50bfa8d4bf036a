"""The edge's errors, and the one place that turns a refusal into its HTTP status.

The core raises `lightray.errors.RequestError` and its kinds without HTTP codes; the kinds here are the ones only
the edge meets. `http_status` maps every kind to the status clients see, and the app's handlers, its middlewares
and the stream's error events all answer through it, in OpenAI's error shape (`serve_app.openapi_errors`).
"""

from __future__ import annotations

from lightray.errors import Incompatible, NotFound, RequestError, TooLarge


class Unauthenticated(RequestError):
    """No API key, or a key the service does not know (OpenAI's `invalid_api_key`)."""

    def __init__(self, message: str):
        super().__init__("authorization", message, code="invalid_api_key")


class Forbidden(RequestError):
    """The caller's API key may not do this (a priority above its ceiling, another tenant's adapter)."""


class UnsupportedMediaType(RequestError):
    """A body in a content type the endpoint does not read."""


class MisdirectedRequest(RequestError):
    """A request to a host name the service does not answer for (auth off: loopback names only)."""


class TenantOverQuota(RequestError):
    """The tenant is at one of its own admission bounds (`param` names it); retry after `retry_after_s`. Raised
    and answered at the ingress, so it never crosses a handle (its constructor differs from its base's)."""

    def __init__(self, bound: str, message: str, retry_after_s: int):
        super().__init__(bound, message, code="rate_limit_exceeded")
        self.retry_after_s = retry_after_s


class AdapterUnavailable(RequestError):
    """A pinned adapter the Denoiser could not fetch or load (a damaged file, the registry unreachable): the
    service's failure, not the request's, so a 5xx."""


class RequestTimeout(RequestError):
    """The request did not finish within the service's request timeout."""


class ServiceUnavailable(Exception):
    """The graph cannot take this request now (queues full, a stage down); the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 2):
        super().__init__(message)
        self.retry_after_s = retry_after_s


HTTP_STATUS: dict[type[RequestError], int] = {
    RequestError: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    TooLarge: 413,
    UnsupportedMediaType: 415,
    MisdirectedRequest: 421,
    Incompatible: 422,
    TenantOverQuota: 429,
    AdapterUnavailable: 500,
    RequestTimeout: 504,
}
"""The status each kind of refusal is answered with; a subclass not listed takes its nearest listed base's."""


def http_status(err: RequestError) -> int:
    """The HTTP status `err` is answered with (`HTTP_STATUS`, by the nearest listed class)."""
    return next(HTTP_STATUS[kind] for kind in type(err).__mro__ if kind in HTTP_STATUS)


def error_type(status: int) -> str:
    """OpenAI's error `type` for a status: the client's mistake below 500, the server's from 500."""
    return "invalid_request_error" if status < 500 else "server_error"

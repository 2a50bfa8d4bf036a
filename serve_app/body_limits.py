"""Bounds on request bodies, and authentication before any body is read (an ASGI middleware).

Why a middleware: FastAPI reads and parses a JSON body before a route's dependencies run, so an unauthenticated
client could make the ingress buffer and parse gigabytes before `get_principal` refused it. Here, before the app
sees the request:

1. with auth on, a `/v1/` request that carries a body (POST, PUT, PATCH) and no valid API key is answered 401 — its
   body is never read;
2. a body whose `Content-Length` exceeds the route's bound is answered 413 at once;
3. a JSON route's body is read here, at most its bound + 1 bytes, and answered 413 if it is longer (a chunked
   upload declares no length); the app then gets the bytes read. An edit's body is not read here: the route reads
   it once admitted (`serve_app.admission`), through a `receive` that raises a 413 `RequestError` past the bound.

The bounds (`ServiceSettings`): `max_json_body_bytes` for every route but the edits, whose uploads carry up to
two images (`edit_body_limit`).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lightray.errors import RequestError, TooLarge
from lightray.models.qwen_image_edit import MAX_INPUT_IMAGES
from serve_app.auth import ApiKeyAuth
from serve_app.openapi_errors import request_error_response
from serve_app.settings import ServiceSettings

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
EDITS_PATH = "/v1/images/edits"


def edit_body_limit(settings: ServiceSettings) -> int:
    """Bytes an edit's body may take: its most images (an image and its mask, or an instruction edit's input
    images), each maximal and base64-inflated (JSON bodies carry them so), and the text fields."""
    return max(2, MAX_INPUT_IMAGES) * (settings.max_image_bytes * 4 // 3 + 4) + 1024 * 1024


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: ServiceSettings, auth: ApiKeyAuth):
        self.app = app
        self.auth = auth
        self.json_limit = settings.max_json_body_bytes
        self.edit_limit = edit_body_limit(settings)

    def limit_for(self, path: str) -> int:
        return self.edit_limit if path.rstrip("/") == EDITS_PATH else self.json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self.limit_for(path)
        try:
            if path.startswith("/v1/"):
                self._authenticate(scope)
            _check_declared(scope, limit)
            if limit == self.edit_limit:
                app_receive = _capped(receive, limit)
            else:
                app_receive = _replay(await _read(receive, limit), receive)
        except RequestError as err:
            await answer_error(err, scope, send)
            return
        await self.app(scope, app_receive, send)

    def _authenticate(self, scope: Scope) -> None:
        """ApiKeyAuth on the headers alone (the route authenticates again, the same way, for its principal)."""
        header = Request(scope).headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        self.auth.authenticate(token.strip() if scheme.lower() == "bearer" else None, Request(scope))



def _too_large(limit: int) -> RequestError:
    return TooLarge("request", f"request body exceeds {limit} bytes, the most accepted here",
                    code="request_too_large")


def _check_declared(scope: Scope, limit: int) -> None:
    declared = Request(scope).headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge("request", f"request body is {declared} bytes; at most {limit} are accepted",
                       code="request_too_large")


async def _read(receive: Receive, limit: int) -> bytes:
    """The whole body, or a 413 `RequestError` as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _capped(receive: Receive, limit: int) -> Receive:
    """`receive` that raises a 413 `RequestError` once the body passes `limit` bytes (the app's error handler
    answers it)."""
    received = 0

    async def capped() -> Message:
        nonlocal received
        message = await receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _too_large(limit)
        return message

    return capped


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's `receive`: the body read, in one message, then whatever the connection says next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def answer_error(err: RequestError, scope: Scope, send: Send) -> None:
    """`err` answered from a middleware, as the app's own handler answers it (`request_error_response`)."""
    await request_error_response(err)(scope, _never_receive, send)


async def _never_receive() -> Message:
    return {"type": "http.disconnect"}

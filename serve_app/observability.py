"""Request ids at the HTTP edge: every request has one, a client's `X-Request-Id` is honoured, and the response
carries it back (error responses included).

Behind Ray Serve's HTTP proxy the proxy does most of this already: it keeps a client's `x-request-id` or makes
one, puts it in the request headers the ingress sees, makes it the Serve request id (which Serve's logs print
and every handle call carries to the stage replicas) and appends `X-Request-ID` to the response. The ingress
then only reads it (`request_id_of`); the Serve ingress sets `app.state.request_id_echoed_by_proxy` so the
header is not sent twice. Served some other way (uvicorn, the tests' in-process client) this middleware makes
and returns the id itself.
"""

from __future__ import annotations

import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"


def request_id_of(request: Request) -> str:
    """The id of this request (set by `RequestIdMiddleware`)."""
    return request.scope.get("state", {}).get("request_id") or request.headers.get(REQUEST_ID_HEADER, "")


def echoes_request_id(request: Request) -> bool:
    """Whether the app itself must put the id on the response (not when Serve's proxy does)."""
    return not getattr(request.app.state, "request_id_echoed_by_proxy", False)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = MutableHeaders(scope=scope)
        request_id = headers.get(REQUEST_ID_HEADER, "").strip()
        if not request_id:
            request_id = uuid.uuid4().hex
            headers[REQUEST_ID_HEADER] = request_id
        scope.setdefault("state", {})["request_id"] = request_id
        app = scope.get("app")
        if app is not None and getattr(app.state, "request_id_echoed_by_proxy", False):
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)

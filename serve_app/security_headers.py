"""Response headers that keep browsers from misusing what the service sends (an ASGI middleware).

Every response: `X-Content-Type-Options: nosniff` (an image or JSON is never run as a script or page). Every HTML
response (the playground, `/docs`): a Content-Security-Policy, `X-Frame-Options: DENY` and no referrer — the page
can be neither framed (clickjacking) nor made to load another origin's scripts, on the origin where the playground
keeps an API key. The playground is one self-contained page (inline script and style, no third-party anything);
`/docs` is FastAPI's Swagger UI, whose script comes from a CDN without SRI, so it is served only with auth off
(`create_app`: a loopback, single-user service has no keys to steal) and its policy names that CDN alone.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data: blob:; connect-src 'self' data: blob:; base-uri 'none'; form-action 'self'; "
               "frame-ancestors 'none'")
"""The playground's policy: its own inline script and style, images from data and blob URLs (results, previews,
the mask canvas), requests to this origin only (and to data/blob URLs: "edit" fetches a result's data URL)."""
DOCS_CDN = "https://cdn.jsdelivr.net"
DOCS_POLICY = (f"default-src 'self'; script-src 'self' 'unsafe-inline' {DOCS_CDN}; "
               f"style-src 'self' 'unsafe-inline' {DOCS_CDN}; img-src 'self' data: https://fastapi.tiangolo.com; "
               "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")
"""Swagger UI's policy (auth off only): FastAPI's page loads swagger-ui from the CDN and its favicon."""


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"].startswith(("/docs", "/redoc"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Content-Security-Policy"] = DOCS_POLICY if docs else PAGE_POLICY
                    headers["X-Frame-Options"] = "DENY"
                    headers["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, send_with_headers)

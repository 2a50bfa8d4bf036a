"""With auth off, answer only requests addressed to this machine (an ASGI middleware).

Auth off is for one user on loopback (configs/serve/local.yaml). Binding to 127.0.0.1 keeps other machines out, but
not a web page on another site: it can point its own DNS name at 127.0.0.1 (DNS rebinding) and call the keyless API
from the user's browser, including multipart edits, which are CORS-simple requests. Such a request carries that
site's name in its Host header, so a Host that is not one of `ServiceSettings.local_hosts` is answered 421 (the
request was misdirected) before anything else runs.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.body_limits import answer_error
from serve_app.errors import MisdirectedRequest


class LocalOnlyMiddleware:
    def __init__(self, app: ASGIApp, hosts: list[str]):
        self.app = app
        self.hosts = {h.lower() for h in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and host_name(scope) not in self.hosts:
            err = MisdirectedRequest("host", f"this service has no API keys and answers only requests to "
                                             f"{', '.join(sorted(self.hosts))}", code="misdirected_request")
            await answer_error(err, scope, send)
            return
        await self.app(scope, receive, send)


def host_name(scope: Scope) -> str:
    """The Host header's name, without its port ("[::1]:8000" → "[::1]", "localhost:8000" → "localhost")."""
    host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "").strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

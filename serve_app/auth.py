"""API keys → tenants. A request's `Authorization: Bearer <key>` names its tenant; the routers scope adapters to it.

Keys are kept only as SHA-256 digests once the app is built, compared in constant time, and never logged: a
failed attempt logs the client address, not the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging

from fastapi import Request

from lightray.schemas import RequestError
from serve_app.settings import ServiceSettings

logger = logging.getLogger("lightray.auth")


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling. `tenant` None means auth is off (the local single-user service): every adapter is usable."""

    tenant: str | None


class Unauthenticated(RequestError):
    """401: no key, or a key the service does not know (OpenAI's `invalid_api_key`)."""

    def __init__(self, message: str):
        super().__init__("authorization", message, status=401, code="invalid_api_key")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyAuth:
    def __init__(self, settings: ServiceSettings):
        self.enabled = settings.auth_enabled
        self._tenants = [(_digest(k.key.get_secret_value()), k.tenant) for k in settings.api_keys]

    def authenticate(self, token: str | None, request: Request) -> Principal:
        """`token`: the bearer token of the request's Authorization header, if it had one."""
        if not self.enabled:
            return Principal(tenant=None)
        if not token:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(token)
        tenant = None
        for known, owner in self._tenants:  # every entry compared: timing does not tell which key was close
            if hmac.compare_digest(digest, known):
                tenant = owner
        if tenant is None:
            client = request.client.host if request.client else "?"
            logger.warning("rejected an unknown API key from %s on %s", client, request.url.path)
            raise Unauthenticated("invalid API key")
        return Principal(tenant=tenant)

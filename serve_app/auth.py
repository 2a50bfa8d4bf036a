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

from lightray.contracts import Priority
from serve_app.admission import TenantQuota
from serve_app.errors import Unauthenticated
from serve_app.settings import ServiceSettings

logger = logging.getLogger("lightray.auth")


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling."""

    tenant: str | None
    """The API key's tenant; None means auth is off (the local single-user service): every adapter is usable."""
    default_priority: Priority = "interactive"
    """Scheduling class of this caller's requests that name none (the key's `priority`, or the service's
    `default_priority` when auth is off)."""
    max_priority: Priority | None = None
    """The most urgent class this caller may ask for (the key's `priority_ceiling`); None: any (auth off)."""
    quota: TenantQuota | None = None
    """The tenant's admission bounds, as this key sets them; None: only the ingress's bounds (auth off)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeyAuth:
    def __init__(self, settings: ServiceSettings):
        self.enabled = settings.auth_enabled
        self._anonymous = Principal(tenant=None, default_priority=settings.default_priority)
        self._principals = [(_digest(k.key.get_secret_value()),
                             Principal(tenant=k.tenant, default_priority=k.priority, max_priority=k.priority_ceiling,
                                       quota=TenantQuota.of_key(k, settings)))
                            for k in settings.api_keys]

    def authenticate(self, token: str | None, request: Request) -> Principal:
        """`token`: the bearer token of the request's Authorization header, if it had one."""
        if not self.enabled:
            return self._anonymous
        if not token:
            raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(token)
        principal = None
        for known, owner in self._principals:  # every entry compared: timing does not tell which key was close
            if hmac.compare_digest(digest, known):
                principal = owner
        if principal is None:
            client = request.client.host if request.client else "?"
            logger.warning("rejected an unknown API key from %s on %s", client, request.url.path)
            raise Unauthenticated("invalid API key")
        return principal

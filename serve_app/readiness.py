"""`/readyz`'s check of the stages, shared: one fan-out of health checks per TTL however many probes ask."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


READINESS_TTL_S = 2.0
"""How long one fan-out of health checks to the stages answers `/readyz`: a load balancer polling from many places,
or a flood of probes, costs the stages one check per stage per this many seconds."""


class SharedCheck:
    """An async check run at most once per `ttl_s`, its answer shared: callers within the TTL get the last answer,
    and callers while it runs wait for that one run (never a second, concurrent one). So any number of concurrent
    probes gives one answer, and the stages see no more checks than the TTL allows."""

    def __init__(self, check: Callable[[], Awaitable[dict[str, bool]]], ttl_s: float):
        self._check, self.ttl_s = check, ttl_s
        self._answer: dict[str, bool] | None = None
        self._answered_at = 0.0
        self._running: asyncio.Future | None = None

    async def get(self) -> dict[str, bool]:
        if self._answer is not None and time.monotonic() - self._answered_at < self.ttl_s:
            return self._answer
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._running)

    async def _refresh(self) -> dict[str, bool]:
        try:
            answer = await self._check()
            self._answer, self._answered_at = answer, time.monotonic()
            return answer
        finally:
            self._running = None

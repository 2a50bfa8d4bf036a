"""The engine's scheduling policy, in one place: which requests run at the next step.

At every step boundary `StepScheduler.schedule` looks at every live request (running, paused or new) and
returns the ones to run, grouped by latent grid (one transformer forward per grid). The policy
(docs/engine.md):

1. Priority first: every `interactive` request is considered before any `batch` one.
2. Within a priority, requests that have started (running or paused) come before new ones, oldest first, so
   a started request is not overtaken by a newcomer of its own class: preemption only happens across classes.
3. New requests of one priority are admitted tenant-fair: the next one comes from the tenant with the fewest
   rows already chosen for this step, oldest first within a tenant (FCFS when there is one tenant).
4. Requests are taken in that order while they fit the budget (`EngineConfig.max_batch_rows`, and
   `max_batch_tokens` if set); the first request that does not fit ends the step's batch (no backfilling, so a
   large request cannot be starved by a stream of small ones). The first request always runs, even if it alone
   exceeds the budget.
5. A started request that is not chosen is paused: it keeps its latents and step index and resumes, with the
   same result, when it is chosen again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Protocol

from lightray.config import EngineConfig
from lightray.contracts import PRIORITIES, Priority


class Schedulable(Protocol):
    seq: int
    """Arrival order."""
    priority: Priority
    tenant: str | None
    rows: int
    """Transformer rows per step (images, doubled with true CFG)."""
    image_tokens: int
    grid: tuple[int, int]
    """Latent grid (height, width) after packing: requests batch together only on the same grid."""
    started: bool


@dataclasses.dataclass(frozen=True)
class StepPlan:
    batches: tuple[tuple[Schedulable, ...], ...]
    """Requests to run this step, one tuple per latent grid (one forward each), in scheduling order."""
    paused: tuple[Schedulable, ...]
    """Started requests left out of this step."""

    @property
    def rows(self) -> int:
        return sum(r.rows for batch in self.batches for r in batch)


class StepScheduler:
    def __init__(self, config: EngineConfig):
        self.config = config

    def order(self, live: Iterable[Schedulable]) -> list[Schedulable]:
        """Every live request in the order the policy considers them (points 1-3 above)."""
        ordered: list[Schedulable] = []
        by_priority: dict[Priority, list[Schedulable]] = {p: [] for p in PRIORITIES}
        for request in live:
            by_priority[request.priority].append(request)
        for priority in PRIORITIES:
            requests = by_priority[priority]
            ordered.extend(sorted((r for r in requests if r.started), key=lambda r: r.seq))
            ordered.extend(_tenant_fair(sorted((r for r in requests if not r.started), key=lambda r: r.seq)))
        return ordered

    def schedule(self, live: Sequence[Schedulable]) -> StepPlan:
        chosen: list[Schedulable] = []
        rows = tokens = 0
        for request in self.order(live):
            fits = rows + request.rows <= self.config.max_batch_rows and (
                self.config.max_batch_tokens is None
                or tokens + request.rows * request.image_tokens <= self.config.max_batch_tokens)
            if chosen and not fits:
                break
            chosen.append(request)
            rows += request.rows
            tokens += request.rows * request.image_tokens
        by_grid: dict[tuple[int, int], list[Schedulable]] = {}
        for request in chosen:
            by_grid.setdefault(request.grid, []).append(request)
        picked = {id(r) for r in chosen}
        paused = tuple(r for r in live if r.started and id(r) not in picked)
        return StepPlan(tuple(tuple(b) for b in by_grid.values()), paused)


def _tenant_fair(requests: list[Schedulable]) -> list[Schedulable]:
    """Round-robin over tenants, weighted by rows: the next request comes from the tenant with the fewest rows
    taken so far (ties: the earlier request). `requests` is in arrival order; so is each tenant's share."""
    queues: dict[str | None, list[Schedulable]] = {}
    for request in requests:
        queues.setdefault(request.tenant, []).append(request)
    taken = {tenant: 0 for tenant in queues}
    out: list[Schedulable] = []
    while queues:
        tenant = min(queues, key=lambda t: (taken[t], queues[t][0].seq))
        request = queues[tenant].pop(0)
        taken[tenant] += request.rows
        out.append(request)
        if not queues[tenant]:
            del queues[tenant]
    return out

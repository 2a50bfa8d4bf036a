"""The engine's scheduling policy, in one place: which requests run at the next step.

At every step boundary `StepScheduler.schedule` looks at every live request (running, paused or new) and
returns the ones to run, grouped by sequence signature (one transformer forward per signature: the latent grid,
plus the grids of an edit's condition images). The policy
(docs/engine.md):

1. Priority first: every `interactive` request is considered before any `batch` one.
2. Within a priority, a request that has waited `EngineConfig.starvation_steps` steps or more without running
   comes first (oldest first): nothing waits for ever.
3. Then tenants take their fair share: the next request is always one of the tenant with the least rows, counting
   the rows it ran in recent steps (`EngineConfig.fair_share_decay` per step) and the rows already chosen for this
   step. A tenant over its fair share of rows waits first, however short its requests are: one tenant's flood of
   requests cannot keep another tenant's out of the steps. Ties go to the tenant whose next request has the least
   remaining work, then to the earlier request.
4. Within a tenant, least remaining work first (rows × steps left): a 4-step Lightning request that arrives while
   50-step CFG requests run joins at the next step instead of queueing behind them (no head-of-line blocking), and
   a request near its end finishes before a fresh one of the same size starts. With one tenant (auth off: the
   single local user) the order is exactly least remaining work first, FCFS on ties.
5. Requests are taken in that order while they fit the budget (`EngineConfig.max_batch_rows`, and
   `max_batch_tokens` if set); the first request that does not fit ends the step's batch (no backfilling past
   it). The first request always runs, even if it alone exceeds the budget.
6. A started request that is not chosen is paused: it keeps its latents and step index and resumes, with the
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
    remaining_steps: int
    waited_steps: int
    """Engine steps since this request last ran (or since it arrived)."""
    sequence_tokens: int
    """Image tokens of one row: the noise tokens, plus an edit's condition tokens."""
    signature: tuple
    """What a row's sequence looks like (the latent grid, and an edit's condition grids): requests batch together
    only on the same signature (RoPE and the sequence length are per forward)."""
    started: bool


@dataclasses.dataclass(frozen=True)
class StepPlan:
    batches: tuple[tuple[Schedulable, ...], ...]
    """Requests to run this step, one tuple per sequence signature (one forward each), in scheduling order."""
    paused: tuple[Schedulable, ...]
    """Started requests left out of this step."""

    @property
    def rows(self) -> int:
        return sum(r.rows for batch in self.batches for r in batch)


class StepScheduler:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.recent_rows: dict[str | None, float] = {}
        """Rows each tenant ran in recent steps, each step's weighted by `fair_share_decay` per step since."""

    def order(self, live: Iterable[Schedulable]) -> list[Schedulable]:
        """Every live request in the order the policy considers them (points 1-4 above)."""
        ordered: list[Schedulable] = []
        by_priority: dict[Priority, list[Schedulable]] = {p: [] for p in PRIORITIES}
        for request in live:
            by_priority[request.priority].append(request)
        for priority in PRIORITIES:
            requests = by_priority[priority]
            starving = [r for r in requests if r.waited_steps >= self.config.starvation_steps]
            ordered.extend(sorted(starving, key=lambda r: r.seq))
            ordered.extend(self._fair_share([r for r in requests if r.waited_steps < self.config.starvation_steps]))
        return ordered

    def schedule(self, live: Sequence[Schedulable]) -> StepPlan:
        """The requests to run at this step (and those to pause); records the rows each tenant runs."""
        chosen: list[Schedulable] = []
        rows = tokens = 0
        for request in self.order(live):
            fits = rows + request.rows <= self.config.max_batch_rows and (
                self.config.max_batch_tokens is None
                or tokens + request.rows * request.sequence_tokens <= self.config.max_batch_tokens)
            if chosen and not fits:
                break
            chosen.append(request)
            rows += request.rows
            tokens += request.rows * request.sequence_tokens
        by_signature: dict[tuple, list[Schedulable]] = {}
        for request in chosen:
            by_signature.setdefault(request.signature, []).append(request)
        picked = {id(r) for r in chosen}
        paused = tuple(r for r in live if r.started and id(r) not in picked)
        self._record(chosen)
        return StepPlan(tuple(tuple(b) for b in by_signature.values()), paused)

    def _record(self, chosen: list[Schedulable]) -> None:
        decay = self.config.fair_share_decay
        recent = {tenant: rows * decay for tenant, rows in self.recent_rows.items() if rows * decay >= 0.01}
        for request in chosen:
            recent[request.tenant] = recent.get(request.tenant, 0.0) + request.rows
        self.recent_rows = recent

    def _fair_share(self, requests: list[Schedulable]) -> list[Schedulable]:
        """Point 3 and 4: take the next request of the tenant with the fewest recent plus chosen rows (ties: the
        least remaining work, then the earlier request), each tenant's requests least remaining work first."""
        queues: dict[str | None, list[Schedulable]] = {}
        for request in sorted(requests, key=lambda r: (r.rows * r.remaining_steps, r.seq), reverse=True):
            queues.setdefault(request.tenant, []).append(request)  # each tenant's next request last
        rows = {tenant: self.recent_rows.get(tenant, 0.0) for tenant in queues}
        out: list[Schedulable] = []
        while queues:
            tenant = min(queues, key=lambda t: (rows[t], queues[t][-1].rows * queues[t][-1].remaining_steps,
                                                queues[t][-1].seq))
            pick = queues[tenant].pop()
            if not queues[tenant]:
                del queues[tenant]
            rows[tenant] += pick.rows
            out.append(pick)
        return out

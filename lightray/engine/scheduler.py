"""The engine's scheduling policy, in one place: which requests run at the next step.

At every step boundary `StepScheduler.schedule` looks at every live request (running, paused or new) and
returns the ones to run, grouped by sequence signature (one transformer forward per signature: the latent grid,
plus the grids of an edit's condition images). The policy
(docs/engine.md):

1. Priority first: every `interactive` request is considered before any `batch` one.
2. Within a priority, a request that has waited `EngineConfig.starvation_steps` steps or more without running
   comes first (oldest first): nothing waits for ever.
3. Then least remaining work first (rows × steps left): a 4-step Lightning request that arrives while 50-step
   CFG requests run joins at the next step instead of queueing behind them (no head-of-line blocking), and a
   request near its end finishes before a fresh one of the same size starts.
4. Ties go tenant-fair: the tenant with the fewest rows already chosen for this step first, then arrival order
   (FCFS when there is one tenant).
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
            ordered.extend(_least_work_first([r for r in requests if r.waited_steps < self.config.starvation_steps]))
        return ordered

    def schedule(self, live: Sequence[Schedulable]) -> StepPlan:
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
        return StepPlan(tuple(tuple(b) for b in by_signature.values()), paused)


def _least_work_first(requests: list[Schedulable]) -> list[Schedulable]:
    """Least remaining work first; among equal work, the tenant with the fewest rows taken so far, then the
    earlier request."""
    pending = sorted(requests, key=lambda r: (r.rows * r.remaining_steps, r.seq))
    taken: dict[str | None, int] = {}
    out: list[Schedulable] = []
    while pending:
        work = pending[0].rows * pending[0].remaining_steps
        tied = [r for r in pending if r.rows * r.remaining_steps == work]
        pick = min(tied, key=lambda r: (taken.get(r.tenant, 0), r.seq))
        pending.remove(pick)
        taken[pick.tenant] = taken.get(pick.tenant, 0) + pick.rows
        out.append(pick)
    return out

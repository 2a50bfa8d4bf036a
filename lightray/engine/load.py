"""The engine's own load, in seconds of work: what autoscaling should see instead of a request count, since one
request can cost 100x another (4 steps at 64² against 50 steps with CFG at 256², n = 4).

`StepCurve` learns a step's time from the engine's own forwards: a forward costs a fixed part plus a part per
token-row (rows x noise tokens per row), fitted by least squares over exponentially decayed sums, so it follows
the machine it runs on (a GPU's curve is flat in rows, a CPU's steep) without configuration. `work_seconds` adds up
what every queued and live request still needs: its rows x remaining steps x tokens at the per-token-row cost, and
the fixed part once per step the engine must still run (the longest remaining request, since rows of different
requests share a forward).

No Ray, no torch.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable


class StepCurve:
    """forward_s ≈ fixed_s + per_token_row_s x token_rows, fitted online (decay `decay` per observation)."""

    def __init__(self, decay: float = 0.98, prior_fixed_s: float = 0.01, prior_per_token_row_s: float = 2e-5):
        self.decay = decay
        self._lock = threading.Lock()
        self._n = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self.prior = (prior_fixed_s, prior_per_token_row_s)
        self.observations = 0

    def observe(self, token_rows: float, seconds: float) -> None:
        with self._lock:
            d = self.decay
            self._n = self._n * d + 1
            self._sx = self._sx * d + token_rows
            self._sy = self._sy * d + seconds
            self._sxx = self._sxx * d + token_rows * token_rows
            self._sxy = self._sxy * d + token_rows * seconds
            self.observations += 1

    def coefficients(self) -> tuple[float, float]:
        """(fixed_s, per_token_row_s). With one size of forward seen, the line through the origin's ratio."""
        with self._lock:
            if self._n == 0:
                return self.prior
            var = self._n * self._sxx - self._sx ** 2
            if var <= 1e-9 * max(self._n * self._sxx, 1e-12):  # one x seen: no slope to fit
                return 0.0, self._sy / max(self._sx, 1e-9)
            slope = (self._n * self._sxy - self._sx * self._sy) / var
            fixed = (self._sy - slope * self._sx) / self._n
            if slope <= 0:  # noise on a flat curve
                return self._sy / self._n, 0.0
            return max(fixed, 0.0), slope

    def step_s(self, token_rows: float) -> float:
        fixed, per = self.coefficients()
        return fixed + per * token_rows


def work_seconds(requests: Iterable[tuple[int, int, int]], curve: StepCurve, max_batch_rows: int) -> float:
    """Seconds of work left in `requests`, each (rows, remaining steps, noise tokens per row).

    The per-token-row part adds up over all rows; the fixed part is paid once per forward: at least the longest
    request's remaining steps, more when the rows exceed one step's budget (`max_batch_rows`)."""
    fixed, per = curve.coefficients()
    token_row_steps = row_steps = longest = 0
    for rows, left, tokens in requests:
        if rows <= 0 or left <= 0:
            continue
        token_row_steps += rows * left * tokens
        row_steps += rows * left
        longest = max(longest, left)
    forwards = max(longest, math.ceil(row_steps / max(max_batch_rows, 1)))
    return per * token_row_steps + fixed * forwards


class QueueWork:
    """Seconds of queued and running work in a batching stage (the TextEncoder's and VaeDecoder's `@serve.batch`
    queues): units of work held (prompts, or decoded pixels) x seconds per unit, learnt as a moving average of what
    finished calls measured. `add` when a request enters, `done` when it leaves with its measured seconds."""

    def __init__(self, prior_s_per_unit: float, alpha: float = 0.2):
        self._lock = threading.Lock()
        self.units = 0.0
        self.s_per_unit = prior_s_per_unit
        self.alpha = alpha

    def add(self, units: float) -> None:
        with self._lock:
            self.units += units

    def done(self, units: float, seconds: float | None = None) -> None:
        with self._lock:
            self.units = max(0.0, self.units - units)
            if seconds is not None and units > 0:
                self.s_per_unit += self.alpha * (seconds / units - self.s_per_unit)

    def work_seconds(self) -> float:
        with self._lock:
            return self.units * self.s_per_unit

"""Serve autoscaling on the engine's own load (ray 2.60 custom policies: `autoscaling_config.policy`).

The Denoiser reports `work_s` (`Denoiser.record_autoscaling_stats`): seconds of queued and live work, from its
engine's measured step-time curve (`lightray.engine.load`). `WorkSecondsPolicy` asks for as many replicas as
that work needs for each to hold about `target_work_s` seconds of it: a 50-step CFG request at 256², n = 4 counts
hundreds of times a 4-step 64² one, where `target_ongoing_requests` counts both as 1. Serve's wrapper
(`_apply_autoscaling_config`) still applies min/max replicas and the up/down-scale delays of the YAML.

    autoscaling_config:
      min_replicas: 1
      max_replicas: 3
      policy:
        policy_function: deployments.autoscaling:WorkSecondsPolicy
        policy_kwargs: {target_work_s: 4}
"""

from __future__ import annotations

WORK_METRIC = "work_s"


class WorkSecondsPolicy:
    """desired replicas = (work seconds reported by all replicas, averaged over the look-back window) / target."""

    def __init__(self, target_work_s: float = 4.0, metric: str = WORK_METRIC):
        if target_work_s <= 0:
            raise ValueError("target_work_s must be > 0")
        self.target_work_s = target_work_s
        self.metric = metric

    def __call__(self, ctx) -> tuple[float, dict]:
        per_replica = (ctx.aggregated_metrics or {}).get(self.metric) or {}
        if ctx.current_num_replicas == 0 or not per_replica:
            return ctx.target_num_replicas, {}
        total = sum(per_replica.values())
        # Replicas that have not reported yet (just started) hold no work; the sum covers the reporting ones.
        return desired_replicas(total, self.target_work_s), {"work_s": total}


def desired_replicas(total_work_s: float, target_work_s: float) -> float:
    """Replicas for `total_work_s` seconds of work at `target_work_s` each (fractional; Serve rounds and bounds)."""
    return total_work_s / target_work_s

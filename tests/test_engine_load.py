"""The engine's load in seconds of work (lightray/engine/load.py) and the autoscaling policy that scales on it
(deployments/autoscaling.py). The multi-node benchmark (benchmarks/multinode.py) runs both on a real cluster."""

from __future__ import annotations

import types

import pytest

from deployments.autoscaling import WorkSecondsPolicy
from lightray.engine.load import StepCurve, work_seconds


def test_step_curve_fits_fixed_and_per_token_row():
    curve = StepCurve()
    for rows in (1, 2, 4, 8, 16):
        curve.observe(rows * 64, 0.007 + 1e-4 * rows * 64)
    fixed, per = curve.coefficients()
    assert fixed == pytest.approx(0.007, rel=1e-6) and per == pytest.approx(1e-4, rel=1e-6)
    # One forward size only: no slope to fit, the ratio through the origin.
    flat = StepCurve()
    flat.observe(64, 0.02)
    assert flat.coefficients() == pytest.approx((0.0, 0.02 / 64))


def test_work_seconds_weighs_requests_by_rows_steps_and_tokens():
    curve = StepCurve()
    for rows in (1, 8):
        curve.observe(rows * 16, 0.01 + 0.001 * rows * 16)
    light = work_seconds([(1, 4, 16)], curve, max_batch_rows=8)  # Lightning-4 at 64²: 1 row, 16 tokens
    heavy = work_seconds([(8, 50, 256)], curve, max_batch_rows=8)  # base 50 steps, CFG, n=4 at 256²
    assert light == pytest.approx(4 * 0.01 + 4 * 16 * 0.001)
    assert heavy / light > 100  # the >100x spread a request count cannot see
    # Rows beyond one step's budget need more forwards: the fixed part is paid per forward.
    assert work_seconds([(16, 10, 16)], curve, 8) == pytest.approx(20 * 0.01 + 16 * 10 * 16 * 0.001)
    assert work_seconds([], curve, 8) == 0


def _ctx(work: dict, replicas: int = 1):
    return types.SimpleNamespace(aggregated_metrics={"work_s": work}, current_num_replicas=replicas,
                                 target_num_replicas=replicas)


def test_work_seconds_policy_asks_for_replicas_by_work():
    policy = WorkSecondsPolicy(target_work_s=4)
    assert policy(_ctx({"a": 10.0, "b": 6.0}, 2))[0] == pytest.approx(4.0)
    assert policy(_ctx({"a": 0.0}))[0] == 0  # Serve's wrapper bounds it by min_replicas
    assert policy(_ctx({}, 2))[0] == 2  # nothing reported yet: keep the target
    with pytest.raises(ValueError):
        WorkSecondsPolicy(target_work_s=0)


def test_queue_work_counts_held_units_at_the_measured_rate():
    from lightray.engine.load import QueueWork

    q = QueueWork(prior_s_per_unit=0.01, alpha=1.0)
    q.add(3)
    assert q.work_seconds() == pytest.approx(0.03)
    q.done(1, seconds=0.05)  # measured: 50 ms a unit
    assert q.work_seconds() == pytest.approx(2 * 0.05)
    q.done(2)  # failed or cancelled: leaves without a measurement
    assert q.work_seconds() == 0

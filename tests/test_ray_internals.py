"""The Ray internals deployments/metrics.py reads, where Ray has no public API: pinned here, so a Ray upgrade that
moves them fails this test instead of silently dropping metrics or request ids."""

from __future__ import annotations

from ray import serve

from deployments.metrics import metrics_report_interval_ms, request_id


def test_the_metrics_report_interval_is_readable():
    interval = metrics_report_interval_ms()
    assert isinstance(interval, int) and interval > 0


def test_the_serve_request_id_comes_from_serves_request_context():
    assert request_id() == ""  # outside a request
    token = serve.context._serve_request_context.set(serve.context._RequestContext(request_id="req-123"))
    try:
        assert request_id() == "req-123"
    finally:
        serve.context._serve_request_context.reset(token)
    assert request_id() == ""

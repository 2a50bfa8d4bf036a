"""Prometheus metrics and per-request log lines of the stage deployments (Ray Serve's `ray.serve.metrics`).

Every series gets Serve's own `deployment`, `replica` and `application` labels; Ray exports them on each node's
metrics port (`ray start --metrics-export-port`), prefixed `ray_` (docs/observability.md lists them all).

Where the values come from:
* stage latency: the `timings` each stage already records around its work (`deployments.timing.timed`), so the
  histogram and the response's `Server-Timing` header report the same numbers;
* queue wait: a stage's start minus the moment its input was handed off (the ingress's send for the first
  stages, the upstream stage's finish for the chained ones, carried in the data as `handoff_at`, wall-clock
  seconds): routing, the handle's queue, the replica's queue and the argument transfer. Serve's own
  `ray_serve_deployment_queued_queries` is a gauge of the queue length at one moment, not a per-request wait;
* batch size and images: the number of images (seeds) in each denoise call;
* stage batch size: prompts per text-encoder forward and images per VAE decode call, after the exact grouping of
  the requests `serve.batch` gathered (docs/batching.md); Serve's own `ray_serve_actual_batch_size` counts the
  requests per gathered batch;
* adapter cache: a miss is the multiplexed loader running, a hit a lookup served by an adapter loaded for an
  earlier request, an eviction the LRU releasing one (`LoadedAdapter.release`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from ray import serve
from ray.serve import metrics

logger = logging.getLogger("ray.serve")

# Milliseconds; a 64x64 image takes ~10-100 ms per stage on a CPU, a 1328x1328 one seconds on a GPU.
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
# Ray's exporter rebuilds a histogram's `_sum` from bucket midpoints; with bounds halfway between integers each
# bucket (n-0.5, n+0.5] has midpoint n, so the batch-size sum is exact (the API allows n = 1..10).
BATCH_BOUNDARIES = [n + 0.5 for n in range(11)]
ENGINE_ROW_BOUNDARIES = [n + 0.5 for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)]
# Prompts per text-encoder forward (up to 2 per request) and images per VAE decode call (up to n per request):
# unit buckets as above up to 32, then coarser.
STAGE_BATCH_BOUNDARIES = [n + 0.5 for n in range(33)] + [48.5, 64.5, 96.5, 128.5]


class _Metrics:
    def __init__(self) -> None:
        self.stage_latency = metrics.Histogram(
            "lightray_stage_latency_ms", description="Time a stage spent on one request's work, in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("stage",),
        )
        self.queue_wait = metrics.Histogram(
            "lightray_queue_wait_ms",
            description="Time from a request's input being handed off (by the ingress or the upstream stage) to the "
                        "stage starting on it, in milliseconds: routing, queueing and transfer.",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("stage",),
        )
        self.batch_size = metrics.Histogram(
            "lightray_batch_size", description="Images per denoise call.", boundaries=BATCH_BOUNDARIES,
            tag_keys=("model",),
        )
        self.stage_batch_size = metrics.Histogram(
            "lightray_stage_batch_size",
            description="Prompts per text-encoder forward (stage encode) and images per VAE decode call (stage "
                        "decode).",
            boundaries=STAGE_BATCH_BOUNDARIES, tag_keys=("stage",),
        )
        self.images = metrics.Counter(
            "lightray_images_generated", description="Images denoised.", tag_keys=("model", "kind"),
        )
        self.adapter_hits = metrics.Counter(
            "lightray_adapter_cache_hits", description="Tenant-adapter lookups served by an already-loaded adapter.",
        )
        self.adapter_misses = metrics.Counter(
            "lightray_adapter_cache_misses", description="Tenant-adapter lookups that ran the loader (fetch).",
        )
        self.adapter_evictions = metrics.Counter(
            "lightray_adapter_cache_evictions", description="Tenant adapters released by the per-replica LRU.",
        )
        self.adapters_loaded = metrics.Gauge(
            "lightray_adapters_loaded", description="Tenant adapters held by this Denoiser replica.",
        )
        self.engine_step_rows = metrics.Histogram(
            "lightray_engine_step_rows",
            description="Transformer rows (images, doubled with true CFG) in one denoising-engine forward.",
            boundaries=ENGINE_ROW_BOUNDARIES,
        )


@functools.cache
def stage_metrics() -> _Metrics:
    """This process's metric objects (created on first use, inside the replica, so Serve's labels apply)."""
    return _Metrics()


# Two Ray internals, each read in one function below and pinned by tests/test_ray_internals.py (so a Ray upgrade
# that moves them fails a test, not a replica): Ray has no public API for the metrics report interval in effect
# (`RAY_metrics_report_interval_ms`, or a cluster's `_system_config`), nor for the Serve request id of the request
# being handled (`serve.get_replica_context()` describes the replica, not the request).


def metrics_report_interval_ms() -> int:
    """How often this process pushes metrics to its node's exporter, in milliseconds (Ray's internal config)."""
    import ray

    return int(ray._config.metrics_report_interval_ms())


def keep_reporting(gauge, value: Callable[[], float], name: str) -> threading.Thread:
    """Set `gauge` to `value()` every half report interval from a daemon thread. Ray's exporter drops a gauge
    series that has not been reported for two report intervals (`RAY_metrics_report_interval_ms`), and a gauge
    set only when it changes is not reported again, so a quiet replica's gauge would leave the scrape."""
    period_s = max(0.5, metrics_report_interval_ms() / 2000.0)

    def loop() -> None:
        while True:
            time.sleep(period_s)
            try:
                gauge.set(value())
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                logger.exception("could not report %s", name)

    thread = threading.Thread(target=loop, name=f"report-{name}", daemon=True)
    thread.start()
    return thread


def request_id() -> str:
    """The Serve request id of the request being handled (the ingress's `x-request-id`; Serve carries it along
    every handle call), or "" outside a request (Serve's internal request context: see above)."""
    try:
        return serve.context._get_serve_request_context().request_id
    except Exception:  # noqa: BLE001 - never fail a request over its id
        return ""


def record_queue_wait(stage: str, timings: dict[str, float], handoff_at: float | None,
                      started: float | None = None) -> None:
    """`handoff_at` → `started` (wall-clock seconds, `time.time()`; default now) as `<stage>_wait_ms` in `timings`
    and the
    queue-wait histogram. Wall clocks: across nodes the value includes their clock offset (NTP keeps it to about
    a millisecond). A batched stage passes the start of the model call that did the request's work, so the wait
    includes the batch queue and any earlier call of the same batch."""
    if handoff_at is None:
        return
    wait_ms = max(0.0, ((time.time() if started is None else started) - handoff_at) * 1000.0)
    timings[f"{stage}_wait_ms"] = wait_ms
    stage_metrics().queue_wait.observe(wait_ms, tags={"stage": stage})


def record_stages(timings: dict[str, float], *keys: str) -> None:
    """Observe the stage latency histogram for `timings[key]` (e.g. "denoise_ms" → stage "denoise")."""
    m = stage_metrics()
    for key in keys:
        if key in timings:
            m.stage_latency.observe(timings[key], tags={"stage": key.removesuffix("_ms")})


def record_batch(stage: str, size: int) -> None:
    """Observe the stage batch-size histogram: one model call of `stage` ("encode", "decode") over `size` rows."""
    stage_metrics().stage_batch_size.observe(size, tags={"stage": stage})


def log_request(what: str, **fields) -> None:
    """One INFO line per request and stage (`what`, then the `key=value` fields that are not None;
    floats with one decimal). Serve's
    text log format puts the request id in every line itself; it is also written as `request_id=…` so that
    JSON-encoded logs (and anyone grepping) find it in the message too."""
    parts = [f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items() if v is not None]
    logger.info("%s request_id=%s %s", what, request_id(), " ".join(parts))

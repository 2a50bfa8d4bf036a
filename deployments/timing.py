"""Per-stage timings that travel with the data, so the ingress can report where a request's time went."""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def timed(timings: dict[str, float], key: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = (time.perf_counter() - start) * 1000.0

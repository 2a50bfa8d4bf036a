"""Admission control at the ingress: bounded requests and bounded work in progress per ingress replica.

Two bounds, each for one reason:
- **requests** (`max_concurrent_requests`): what the Denoisers can hold. Every admitted request takes a place in a
  Denoiser engine (`max_live_requests`) or in Serve's queue in front of it.
- **work** (`max_admitted_work`): how long the admitted requests take. Requests differ by orders of magnitude (a
  Lightning 8-step 1024² image is 8 units, a 50-step true-CFG n=4 request at 1536² is 900), so a count alone either
  admits minutes of queued GPU time, which then ends in 504s, or turns cheap requests away. A request's work is
  `request_work`: denoising steps × images × rows per image (2 with true CFG) × pixels / 1024², i.e. transformer
  row-steps at 1024², which is what the Denoiser's step time is proportional to (docs/capacity.md).

Serve's `max_queued_requests` on the Denoiser alone does not bound a burst here: the ingress passes the
TextEncoder's response straight into the Denoiser call, and Serve's router checks the queue bound when the call is
made but counts a request as queued only once its arguments have resolved (ray/serve/_private/router.py,
`_route_and_send_request_once`), so requests arriving together all pass the check. Counting at the ingress is
exact, answers in the service's own error format, and leaves the stage queues as the second line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lightray.contracts import DenoiseParams
from lightray.schemas import denoising_steps
from serve_app.backend import ServiceUnavailable

WORK_UNIT_PIXELS = 1024 * 1024
"""One unit of work is one transformer row for one denoising step at 1024² (1 Mpx)."""


def pixel_work(pixels: int) -> float:
    """Work the ingress itself does on an edit's pictures: decoding the uploads (and their alpha) and composing
    the outputs onto the input, counted as one unit per 1024² decoded or composed. Its CPU time is of the order of
    a row-step's GPU time at most (tens of ms per 1024²: a 75 KB PNG with a 33 KB mask, both 4096², took 0.94 s),
    so a burst of large uploads cannot all be decoded at once while the bound admits little denoising."""
    return pixels / WORK_UNIT_PIXELS


def request_work(params: DenoiseParams) -> float:
    """Work a request asks of the Denoiser, in 1024² row-steps: steps it actually runs (image inputs run only
    `strength` of the schedule) × images × rows per image (true CFG doubles them) × its pixels over 1024²."""
    rows = params.n * (2 if params.uses_cfg else 1)
    steps = denoising_steps(params.num_inference_steps, params.strength)
    return steps * rows * params.width * params.height / WORK_UNIT_PIXELS


class Admission:
    """One admitted request: its request slot, and the work it has been charged (`AdmissionLimit.charge`)."""

    def __init__(self, limit: "AdmissionLimit"):
        self._limit = limit
        self.work = 0.0

    def charge(self, work: float) -> None:
        """Charge work of this request to the ingress's bound, before doing it; 503 when it does not fit. An edit
        charges twice: decoding its uploads (`pixel_work`, from their headers), then denoising and composing once
        its spec is known; the work is held until the request ends."""
        self._limit._charge(self, work)


class AdmissionLimit:
    def __init__(self, limit: int, max_work: float | None = None, retry_after_s: int = 2):
        self.limit, self.max_work, self.retry_after_s = limit, max_work, retry_after_s
        self.in_progress = 0  # touched only on the event loop
        self.work_in_progress = 0.0

    @contextlib.contextmanager
    def slot(self) -> Iterator[Admission]:
        """A request slot for the request's lifetime (503 when none is free); `charge` its work once known."""
        if self.in_progress >= self.limit:
            raise ServiceUnavailable(f"the service is at capacity ({self.limit} requests in progress); retry shortly",
                                     retry_after_s=self.retry_after_s)
        self.in_progress += 1
        admission = Admission(self)
        try:
            yield admission
        finally:
            self.in_progress -= 1
            self.work_in_progress -= admission.work

    def _charge(self, admission: Admission, work: float) -> None:
        # A request heavier than the whole bound is admitted when nothing else is charged, so it runs alone rather
        # than never; the preset's limits keep it finite.
        others = self.work_in_progress - admission.work
        if self.max_work is not None and others > 0 and self.work_in_progress + work > self.max_work:
            raise ServiceUnavailable(
                f"the service is at capacity ({self.work_in_progress:g} of {self.max_work:g} units of work in "
                f"progress, this request needs {work:g}); retry shortly", retry_after_s=self.retry_after_s)
        self.work_in_progress += work
        admission.work += work

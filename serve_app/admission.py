"""Admission control at the ingress: bounded requests and bounded work in progress per ingress replica.

Two bounds, each for one reason:
- **requests** (`max_concurrent_requests`): what the Denoisers can hold. Every admitted request takes a place in a
  Denoiser engine (`max_live_requests`) or in Serve's queue in front of it.
- **work** (`max_admitted_work`): how long the admitted requests take. Requests differ by orders of magnitude (a
  Lightning 8-step 1024² image is 8 units, a 50-step true-CFG n=4 request at 1536² is 900), so a count alone either
  admits minutes of queued GPU time, which then ends in 504s, or turns cheap requests away. A request's work is
  `request_work`: denoising steps × images × rows per image (2 with true CFG) × pixels / 1024², i.e. transformer
  row-steps at 1024², which is what the Denoiser's step time is proportional to (docs/capacity.md).

Each tenant has the same two bounds of its own (`TenantQuota`, from its API key's `max_concurrent_requests` and
`max_admitted_work`, by default the service's `tenant_share` of the ingress's): a tenant past its own bound is
answered **429** + `Retry-After` naming the bound (`TenantOverQuota`), because it is that tenant's own load and
the service still has room for the others; the ingress's bounds stay **503** (the service is at capacity). One
tenant's burst so fills at most its share, and the others are still admitted. With auth off there is no tenant
quota: the single local user has the whole ingress.

Serve's `max_queued_requests` on the Denoiser alone does not bound a burst here: the ingress passes the
TextEncoder's response straight into the Denoiser call, and Serve's router checks the queue bound when the call is
made but counts a request as queued only once its arguments have resolved (ray/serve/_private/router.py,
`_route_and_send_request_once`), so requests arriving together all pass the check. Counting at the ingress is
exact, answers in the service's own error format, and leaves the stage queues as the second line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

from lightray.contracts import DenoiseParams
from serve_app.errors import ServiceUnavailable, TenantOverQuota
from serve_app.settings import ApiKey, ServiceSettings

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
    return params.total_steps * rows * params.width * params.height / WORK_UNIT_PIXELS


@dataclasses.dataclass(frozen=True)
class TenantQuota:
    """One tenant's admission bounds at an ingress replica, as the calling API key sets them."""

    tenant: str
    max_requests: int
    """Requests the tenant may have in progress (the key's `max_concurrent_requests`)."""
    max_work: float | None
    """Work the tenant may have in progress, in `request_work` units (the key's `max_admitted_work`); None: no
    bound."""

    @classmethod
    def of_key(cls, key: ApiKey, settings: ServiceSettings) -> "TenantQuota":
        """The key's own bounds, or else the service's `tenant_share` of the ingress's."""
        share = settings.tenant_share
        max_work = key.max_admitted_work
        if max_work is None and settings.max_admitted_work is not None:
            max_work = share * settings.max_admitted_work
        max_requests = key.max_concurrent_requests or max(1, math.ceil(share * settings.max_concurrent_requests))
        return cls(key.tenant, max_requests, max_work)


@dataclasses.dataclass
class Usage:
    """One tenant's requests and work in progress."""

    requests: int = 0
    work: float = 0.0


def _over(held: float, own: float, work: float, bound: float | None) -> bool:
    """Whether `work` more does not fit `bound`, with `held` in progress of which `own` is this request's. A
    request heavier than the whole bound is admitted when no other request is charged, so it runs alone rather
    than never; the preset's limits keep it finite."""
    return bound is not None and held - own > 0 and held + work > bound


class Admission:
    """One admitted request: its request slot, and the work it has been charged (`AdmissionLimit.charge`)."""

    def __init__(self, limit: "AdmissionLimit", quota: TenantQuota | None):
        self._limit, self.quota = limit, quota
        self.work = 0.0

    def charge(self, work: float) -> None:
        """Charge work of this request to the ingress's bound and its tenant's, before doing it: 429 when it does
        not fit the tenant's, 503 when it does not fit the ingress's. An edit charges twice: decoding its uploads
        (`pixel_work`, from their headers), then denoising and composing once its spec is known; the work is held
        until the request ends."""
        self._limit._charge(self, work)


class AdmissionLimit:
    def __init__(self, limit: int, max_work: float | None = None, retry_after_s: int = 2):
        self.limit, self.max_work, self.retry_after_s = limit, max_work, retry_after_s
        self.in_progress = 0  # touched only on the event loop
        self.work_in_progress = 0.0
        self.tenants: dict[str, Usage] = {}
        """Each tenant's requests and work in progress; a tenant with none has no entry."""

    @contextlib.contextmanager
    def slot(self, quota: TenantQuota | None = None) -> Iterator[Admission]:
        """A request slot for the request's lifetime (429 when the tenant of `quota` is at its own bound, 503 when
        the ingress has none free); `charge` its work once known. `quota` None: the ingress's bounds only."""
        usage = self.tenants.get(quota.tenant, Usage()) if quota else None
        if quota and usage.requests >= quota.max_requests:
            raise TenantOverQuota(
                "max_concurrent_requests", f"tenant {quota.tenant!r} is at its bound max_concurrent_requests = "
                f"{quota.max_requests} requests in progress; retry shortly", retry_after_s=self.retry_after_s)
        if self.in_progress >= self.limit:
            raise ServiceUnavailable(f"the service is at capacity ({self.limit} requests in progress); retry shortly",
                                     retry_after_s=self.retry_after_s)
        self.in_progress += 1
        if quota:
            usage.requests += 1
            self.tenants[quota.tenant] = usage
        admission = Admission(self, quota)
        try:
            yield admission
        finally:
            self.in_progress -= 1
            self.work_in_progress -= admission.work
            if quota:
                usage.requests -= 1
                usage.work -= admission.work
                if usage.requests == 0:
                    del self.tenants[quota.tenant]

    def _charge(self, admission: Admission, work: float) -> None:
        quota = admission.quota
        usage = self.tenants[quota.tenant] if quota else None
        if quota and _over(usage.work, admission.work, work, quota.max_work):
            raise TenantOverQuota(
                "max_admitted_work", f"tenant {quota.tenant!r} is at its bound max_admitted_work = "
                f"{quota.max_work:g} ({usage.work:g} units of work in progress, this request needs {work:g}); "
                "retry shortly", retry_after_s=self.retry_after_s)
        if _over(self.work_in_progress, admission.work, work, self.max_work):
            raise ServiceUnavailable(
                f"the service is at capacity ({self.work_in_progress:g} of {self.max_work:g} units of work in "
                f"progress, this request needs {work:g}); retry shortly", retry_after_s=self.retry_after_s)
        self.work_in_progress += work
        if quota:
            usage.work += work
        admission.work += work

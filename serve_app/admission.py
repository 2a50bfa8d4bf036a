"""Admission control at the ingress: a bounded number of generations in progress per ingress replica.

Serve's `max_queued_requests` on the Denoiser alone does not bound a burst here: the ingress passes the
TextEncoder's response straight into the Denoiser call, and Serve's router checks the queue bound when the call is
made but counts a request as queued only once its arguments have resolved (ray/serve/_private/router.py,
`_route_and_send_request_once`), so requests arriving together all pass the check. Counting at the ingress is
exact, answers in the service's own error format, and leaves the stage queues as the second line.
"""

from __future__ import annotations

import contextlib

from serve_app.backend import ServiceUnavailable


class AdmissionLimit:
    def __init__(self, limit: int, retry_after_s: int = 2):
        self.limit, self.retry_after_s = limit, retry_after_s
        self.in_progress = 0  # touched only on the event loop

    @contextlib.contextmanager
    def slot(self):
        if self.in_progress >= self.limit:
            raise ServiceUnavailable(f"the service is at capacity ({self.limit} requests in progress); retry shortly",
                                     retry_after_s=self.retry_after_s)
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1

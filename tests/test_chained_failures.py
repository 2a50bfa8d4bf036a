"""`serve_app.ray_backend._cancelling`, the wait on a chained graph call: a by-value upstream that fails ends the
wait at once with its error and cancels the rest (Ray's gRPC data plane would retry the chained call for ever); a
by-reference upstream is never awaited at the ingress (its arrays stay out of it); a caller that gives up cancels
every stage."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.ray_backend import _cancelling

pytestmark = pytest.mark.unit


class FakeResponse:
    """A `DeploymentResponse` stand-in: awaitable, cancellable, by reference or by value."""

    def __init__(self, by_reference: bool, outcome=None, delay_s: float = 0.0):
        self.by_reference, self.outcome, self.delay_s = by_reference, outcome, delay_s
        self.awaited = self.cancelled = False

    def __await__(self):
        return self._result().__await__()

    async def _result(self):
        self.awaited = True
        await asyncio.sleep(self.delay_s)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self):
        self.cancelled = True


def test_a_failed_by_value_upstream_ends_the_wait_and_cancels_the_stages():
    final = FakeResponse(False, "images", delay_s=60)  # what a chained call with a dead upstream does: never ends
    dead = FakeResponse(False, RuntimeError("Denoiser replica died"), delay_s=0.01)
    text = FakeResponse(False, "embeddings")

    async def run():
        return await asyncio.wait_for(_cancelling(final, text, dead), timeout=5)

    with pytest.raises(RuntimeError, match="Denoiser replica died"):
        asyncio.run(run())
    assert final.cancelled and dead.cancelled and text.cancelled


def test_by_reference_upstreams_are_not_awaited_and_the_result_is_the_last_stages():
    final = FakeResponse(True, "images", delay_s=0.01)
    upstream = FakeResponse(True, "latents")
    assert asyncio.run(_cancelling(final, upstream)) == "images"
    assert not upstream.awaited and not upstream.cancelled
    by_value = FakeResponse(False, "latents")
    assert asyncio.run(_cancelling(FakeResponse(False, "images", delay_s=0.01), by_value)) == "images"
    assert by_value.awaited and not by_value.cancelled


def test_a_caller_that_gives_up_cancels_every_stage():
    final, upstream = FakeResponse(True, "images", delay_s=60), FakeResponse(True, "latents", delay_s=60)

    async def run():
        await asyncio.wait_for(_cancelling(final, upstream), timeout=0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(run())
    assert final.cancelled and upstream.cancelled

"""`serve_app.ray_backend._cancelling`, the wait on a chained graph call: a by-value upstream that fails ends the
wait at once with its error and cancels the rest (Ray's gRPC data plane would retry the chained call for ever); a
by-reference upstream is never awaited at the ingress (its arrays stay out of it); a caller that gives up cancels
every stage. A by-value response's failure names its own stage (`StageFailed`), which the 503 says; the stream's
wait (`_watched_stream`) ends on an upstream's failure the same way."""

from __future__ import annotations

import asyncio

import pytest

from ray.exceptions import ActorUnavailableError

from lightray.schemas import GenerationSpec
from serve_app.errors import ServiceUnavailable
from serve_app.graph_failures import StageFailed, as_client_error
from serve_app.ray_backend import StageCall, _cancelling, _watched_stream

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


class FakeStream(FakeResponse):
    """A `DeploymentResponseGenerator` stand-in: its items, one per `delay_s`."""

    def __init__(self, by_reference: bool, items: list, delay_s: float = 0.0):
        super().__init__(by_reference, None, delay_s)
        self.items = items

    async def __aiter__(self):
        for item in self.items:
            await asyncio.sleep(self.delay_s)
            yield item


SPEC = GenerationSpec(prompt="a red circle", model="lightray-shapes-lightning-4", seeds=(1,), width=64, height=64,
                      num_inference_steps=4, true_cfg_scale=1.0)


def call(response, stage: str = "Stage") -> StageCall:
    return StageCall(stage, response)


def test_a_failed_by_value_upstream_ends_the_wait_and_cancels_the_stages():
    final = FakeResponse(False, "images", delay_s=60)  # what a chained call with a dead upstream does: never ends
    dead = FakeResponse(False, RuntimeError("Denoiser replica died"), delay_s=0.01)
    text = FakeResponse(False, "embeddings")

    async def run():
        return await asyncio.wait_for(_cancelling(call(final), call(text), call(dead, "Denoiser")), timeout=5)

    with pytest.raises(StageFailed, match="the Denoiser stage") as failed:
        asyncio.run(run())
    assert isinstance(failed.value.__cause__, RuntimeError) and "replica died" in str(failed.value.__cause__)
    assert final.cancelled and dead.cancelled and text.cancelled


def test_by_reference_upstreams_are_not_awaited_and_the_result_is_the_last_stages():
    final = FakeResponse(True, "images", delay_s=0.01)
    upstream = FakeResponse(True, "latents")
    assert asyncio.run(_cancelling(call(final), call(upstream))) == "images"
    assert not upstream.awaited and not upstream.cancelled
    by_value = FakeResponse(False, "latents")
    assert asyncio.run(_cancelling(call(FakeResponse(False, "images", delay_s=0.01)), call(by_value))) == "images"
    assert by_value.awaited and not by_value.cancelled


def test_a_caller_that_gives_up_cancels_every_stage():
    final, upstream = FakeResponse(True, "images", delay_s=60), FakeResponse(True, "latents", delay_s=60)

    async def run():
        await asyncio.wait_for(_cancelling(call(final), call(upstream)), timeout=0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(run())
    assert final.cancelled and upstream.cancelled


def test_a_by_reference_failure_is_raised_as_it_is():
    # By reference a chained call also fails when an upstream replica died: the failure cannot name its stage.
    final = FakeResponse(True, ActorUnavailableError("gone", None))
    with pytest.raises(ActorUnavailableError):
        asyncio.run(_cancelling(call(final, "VaeDecoder")))


def test_a_dead_replica_behind_a_stage_failure_is_a_503_naming_that_stage():
    failure = StageFailed("Denoiser-lightray-shapes-edit")
    failure.__cause__ = ActorUnavailableError("gone", None)
    converted = asyncio.run(as_client_error(SPEC, failure))
    assert isinstance(converted, ServiceUnavailable)
    assert "the Denoiser-lightray-shapes-edit stage is unavailable" in str(converted)
    assert converted.retry_after_s > 0
    # A stage's failure that is no replica's loss is that failure itself (a 500), not the wrapper.
    other = StageFailed("VaeDecoder")
    other.__cause__ = ValueError("bad latents")
    assert asyncio.run(as_client_error(SPEC, other)) is other.__cause__


def test_the_stream_ends_when_a_by_value_upstream_fails():
    stream = FakeStream(False, list(range(100)), delay_s=0.05)  # would take 5 s
    dead = FakeResponse(False, RuntimeError("TextEncoder replica died"), delay_s=0.01)

    async def run():
        seen = []
        async for item in _watched_stream(call(stream, "Denoiser"), (call(dead, "TextEncoder"),)):
            seen.append(item)
        return seen

    with pytest.raises(StageFailed, match="the TextEncoder stage"):
        asyncio.run(asyncio.wait_for(run(), timeout=2))


def test_the_stream_gives_its_items_and_names_its_own_failure():
    async def items(stream, *upstream):
        return [item async for item in _watched_stream(call(stream, "Denoiser"), upstream)]

    text = FakeResponse(False, "embeddings")
    assert asyncio.run(items(FakeStream(False, [1, 2, 3]), call(text, "TextEncoder"))) == [1, 2, 3]
    assert text.awaited

    class Failing(FakeStream):
        async def __aiter__(self):
            yield 1
            raise RuntimeError("replica died")

    with pytest.raises(StageFailed, match="the Denoiser stage"):
        asyncio.run(items(Failing(False, [])))
    with pytest.raises(RuntimeError, match="replica died"):  # by reference: as it is
        asyncio.run(items(Failing(True, [])))

"""A graph's failures as a client should see them: a stage's refusal as itself, overload and dead replicas as 503
naming the stage, an adapter the Denoiser could not load as an error naming the adapter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lightray.contracts import AdapterLoadError, EngineFull
from lightray.errors import NotFound, RequestError
from lightray.registry import AdapterCorrupt, AdapterNotFound, AdapterRegistryError
from lightray.schemas import EditSpec, GenerationSpec
from serve_app.backend import GenerationResult, StreamItem
from serve_app.errors import AdapterUnavailable, ServiceUnavailable


# Serve names each replica's actor class `ServeReplica:<app>:<deployment>`; not a public contract, so
# tests/test_faults.py pins it by killing a Denoiser replica and reading the stage back from the 503.
_SERVE_REPLICA_CLASS_PREFIX = "ServeReplica:"


class StageFailed(Exception):
    """A stage's own response failed (`serve_app.ray_backend`): `stage` names its deployment, the failure is the
    `__cause__`. It names the stage of a dead replica without asking the cluster which actor died."""

    def __init__(self, stage: str):
        super().__init__(f"the {stage} stage failed")
        self.stage = stage


def _dead_replica_deployment(lost: BaseException) -> str | None:
    """The deployment whose replica died, from public API rather than Ray's message text: a `RayActorError`
    carries the actor's id (`actor_id`), and the state API (`ray.util.state.get_actor`) its class name. None when
    the error names no actor (a crashed worker, a lost object, a deployment that failed to deploy) or the lookup
    fails. Blocking (a request to the dashboard): call it off the event loop."""
    actor_id = getattr(lost, "actor_id", None)
    if not actor_id:
        return None
    try:
        from ray.util.state import get_actor

        actor = get_actor(actor_id, timeout=15)  # the dashboard answers slowly on a loaded head node
    except Exception:  # noqa: BLE001 - the message falls back to "a stage"; the 503 stands either way
        return None
    class_name = getattr(actor, "class_name", None) or ""
    if not class_name.startswith(_SERVE_REPLICA_CLASS_PREFIX):
        return None
    return class_name.rsplit(":", 1)[-1]


def _find_cause(err: BaseException, types: tuple) -> BaseException | None:
    """The first of `types` along `err`'s chain of causes: a replica's exception reaches the ingress wrapped
    (`RayTaskError.cause`), and a replica that died under a chained call surfaces as the next stage's
    `RayServeException` whose `__cause__` is the `ActorDiedError`."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None)
        if isinstance(err, types) and not isinstance(inner, types):  # prefer a wrapped cause's own message
            return err
        err = inner if isinstance(inner, BaseException) else err.__cause__
    return None


async def client_errors(spec: GenerationSpec | EditSpec, work) -> GenerationResult:
    """`await work`, its failure as a client should see it (`as_client_error`)."""
    try:
        return await work
    except Exception as err:
        converted = await as_client_error(spec, err)
        if converted is err:
            raise
        raise converted from None


async def stream_client_errors(spec: GenerationSpec | EditSpec, items: AsyncIterator[StreamItem]
                               ) -> AsyncIterator[StreamItem]:
    """`items`, a failure on the way as a client should see it (`as_client_error`). Closing this stream closes
    `items` at once (which cancels their work), not whenever it is garbage-collected."""
    try:
        async for item in items:
            yield item
    except Exception as err:
        converted = await as_client_error(spec, err)
        if converted is err:
            raise
        raise converted from None
    finally:
        await items.aclose()


async def as_client_error(spec: GenerationSpec | EditSpec, err: Exception) -> Exception:
    """A graph failure as a client should see it: a stage's `RequestError` → that error (a 4xx naming the field);
    overload or a dead/restarting replica → 503 + Retry-After
    naming the stage (Serve replaces the replica by itself); an adapter the Denoiser could not fetch (corrupt or
    missing in the registry) → an error naming that adapter. Anything else is `err` itself (a 500), unwrapped
    from `StageFailed`."""
    from ray.exceptions import ObjectLostError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    failed = err if isinstance(err, StageFailed) else None
    if failed is not None and isinstance(failed.__cause__, Exception):
        err = failed.__cause__
    refs = ", ".join(repr(a.ref) for a in spec.adapters)
    refused = _find_cause(err, (RequestError,))
    if refused is not None:  # a stage found the request bad (a 2.1 prompt past its encoder's limit)
        return refused
    if isinstance(err, BackPressureError):
        return ServiceUnavailable("the service is at capacity; retry shortly", retry_after_s=2)
    if _find_cause(err, (EngineFull,)) is not None:
        return ServiceUnavailable("the denoiser is at capacity; retry shortly", retry_after_s=2)
    adapter_err = _find_cause(err, (AdapterRegistryError, AdapterLoadError))
    if adapter_err is not None:
        if isinstance(adapter_err, AdapterNotFound):
            return NotFound("lora", f"adapter {refs} is no longer in the registry: {adapter_err}",
                            code="adapter_not_found")
        code = ("adapter_corrupt" if isinstance(adapter_err, (AdapterCorrupt, AdapterLoadError))
                else "adapter_unavailable")
        return AdapterUnavailable("lora", f"adapter {refs} could not be loaded: {adapter_err}", code=code)
    lost = _find_cause(err, (RayActorError, WorkerCrashedError, ObjectLostError, DeploymentUnavailableError))
    if lost is None:
        return err
    stage = failed.stage if failed is not None else await asyncio.to_thread(_dead_replica_deployment, lost)
    where = f"the {stage} stage" if stage else "a stage"
    return ServiceUnavailable(f"{where} is unavailable ({type(lost).__name__}: a replica died or is restarting);"
                              " retry shortly", retry_after_s=5)

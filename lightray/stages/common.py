"""Helpers shared by the stages (and the denoising engine): dtypes, generators, the load-time dtype check and the
health probe."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

HEALTH_PROBE_TIMEOUT_S = 10.0
"""Longest the text encoder's and VAE's health checks wait for their probe (the engine's is
`EngineConfig.health_check_timeout_s`: it also waits for a step boundary). Below Ray Serve's default
`health_check_timeout_s` (30 s), so a hung device is reported by the check itself, with a reason, rather than by
Serve's timeout."""


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def generators(seeds: list[int], device: str) -> list[torch.Generator]:
    """One generator per image: image i's noise depends only on its own seed, so a batch of n reproduces n
    single-image runs (up to float noise from batched matmuls)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def check_parameter_dtype(module: torch.nn.Module, dtype: torch.dtype, what: str) -> None:
    """Raise unless every parameter of `module` has `dtype`: a loader that ignored `dtype=` (diffusers before it
    honoured the argument) or a module kept in another precision would otherwise run silently at another memory
    footprint and numerics than the preset says."""
    wrong = {}
    for name, param in module.named_parameters():
        if param.dtype != dtype:
            wrong.setdefault(param.dtype, []).append(name)
    if wrong:
        found = "; ".join(f"{len(names)} in {d} (e.g. {names[0]})" for d, names in wrong.items())
        raise TypeError(f"{what}: the preset's dtype is {dtype}, but parameters loaded otherwise: {found}")


class HealthProbe:
    """A stage's health check that computes: `probe` (a tiny real forward on the stage's device) must return a
    finite tensor within the timeout.

    What it catches: a CUDA context broken by an earlier fault (an illegal memory access or device-side assert
    makes every later kernel launch and synchronisation raise), a device that hangs, weights gone NaN/Inf, a
    module left unusable. Reading the result (`isfinite(...).item()`) synchronises the device, so an asynchronous
    error surfaces here and not in the next request. `launch` starts the probe and returns its future: by default a
    thread of its own, so a hung device blocks that thread and not the caller; the engine runs it at a step
    boundary instead. One probe is in flight at a time: a check made while one is pending waits for that same probe
    (up to its own timeout) rather than starting another, so checks never pile up threads or commands, and
    concurrent callers (Serve's health check, readiness probes) get the same answer instead of failing each other.
    A hung probe fails every check that waits on it, each within its timeout."""

    def __init__(self, what: str, probe: Callable[[], torch.Tensor],
                 launch: Callable[[Callable[[], None]], concurrent.futures.Future] | None = None):
        self.what = what
        self._probe = probe
        self._launch = launch or _in_thread
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future | None = None

    def _run(self) -> None:
        out = self._probe()
        if not bool(torch.isfinite(out).all().item()):
            raise FloatingPointError("the probe's output is not finite")

    def check(self, timeout_s: float | None = None) -> None:
        timeout_s = HEALTH_PROBE_TIMEOUT_S if timeout_s is None else timeout_s
        with self._lock:
            joined = self._pending is not None and not self._pending.done()
            if not joined:
                self._pending = self._launch(self._run)
            future = self._pending
        try:
            future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            which = "a health probe started earlier" if joined else "the health probe"
            raise TimeoutError(f"{self.what}: {which} did not finish in {timeout_s} s (device hung?)") from None
        except Exception as err:
            raise RuntimeError(f"{self.what}: the health probe failed: {err!r}") from err


def settle(future: concurrent.futures.Future, fn: Callable[[], object]) -> None:
    """Run `fn` and put its result, or what it raised, into `future`."""
    try:
        future.set_result(fn())
    except BaseException as err:  # noqa: BLE001 - whoever waits on the future raises it
        future.set_exception(err)


def _in_thread(fn: Callable[[], None]) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    threading.Thread(target=settle, args=(future, fn), name="health-probe", daemon=True).start()
    return future

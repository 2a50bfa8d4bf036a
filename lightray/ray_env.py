"""The environment every Ray process Lightray starts runs with (`lightray serve`, the test and benchmark cluster in
`testing.local_cluster`): written once here. No Ray import: it only names variables.

Precedence: a variable already set in the caller's environment wins over these defaults (`with_ray_defaults`), so
a user can still turn token auth or usage stats on for one run.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

RAY_SERVE_DATA_PLANE: Mapping[str, str] = MappingProxyType({
    # Handle calls between replicas over gRPC, by value, with the router and user code on each replica's own event
    # loop: Ray Serve's throughput-optimised settings (`RAY_SERVE_THROUGHPUT_OPTIMIZED`) less direct ingress and
    # less its buffered request-path logs (they hold a replica's log lines back until 1,000 are written). Measured
    # side by side in benchmarks/bench_stages.py --ray-env-too (README "Benchmarks"): the per-request overhead at
    # 128² 29 against 40 ms, the throughput at concurrency 8 18.0 against 10.9 img/s. Ray 2.60 under gRPC retries
    # a chained call whose upstream replica died for ever: `serve_app.ray_backend` watches the upstream responses.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
})
"""Ray Serve's data plane as Lightray runs it: part of `RAY_ENV_DEFAULTS`, and set by the container image
(Dockerfile) for the pods KubeRay starts."""

RAY_ENV_DEFAULTS: Mapping[str, str] = MappingProxyType({
    **RAY_SERVE_DATA_PLANE,
    # Explicit, so a stray ~/.ray/auth_token (a bare ray.init() can leave one behind) never switches a local
    # cluster to token auth.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Model loading on a busy 2-core machine outlasts the default 5 s proxy start-up check.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
})
"""Variable → value for every Ray process Lightray starts, unless the caller's environment sets the variable."""


def with_ray_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with `RAY_ENV_DEFAULTS` filled in where `env` does not set a variable."""
    return {**RAY_ENV_DEFAULTS, **env}

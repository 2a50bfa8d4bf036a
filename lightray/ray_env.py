"""The environment every Ray process Lightray starts runs with (`lightray serve`, the test and benchmark cluster in
`testing.local_cluster`): written once here. No Ray import: it only names variables.

Precedence: a variable already set in the caller's environment wins over these defaults (`with_ray_defaults`), so
a user can still turn token auth or usage stats on for one run.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

RAY_ENV_DEFAULTS: Mapping[str, str] = MappingProxyType({
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

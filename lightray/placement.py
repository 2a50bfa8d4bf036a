"""Can every deployment of a Serve config be placed on a cluster? Serve leaves a replica it cannot place PENDING
forever (no error reaches `serve deploy`), so a config asking for more than any node has (8 GPUs a replica on
nodes of 1, a label no node carries) is refused before it is deployed, with a message naming the deployment.

Checked per replica, against each node's totals: its CPUs (Serve's default: 1), GPUs, memory and custom
resources must fit on one node whose labels match its `label_selector` (or one of its `fallback_strategy`
selectors). What other replicas already hold is not counted: a config that fits an empty cluster but not a busy
one is the autoscaler's matter, not a mistake in the config. No Ray import: the nodes come from the caller (Ray's
state API, `GET /api/v0/nodes`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def replica_ask(options: Mapping) -> dict[str, float]:
    """A replica's resource ask from its `ray_actor_options` (Serve's defaults: 1 CPU, no GPU)."""
    ask = {"CPU": float(options.get("num_cpus", 1) if options.get("num_cpus") is not None else 1)}
    if options.get("num_gpus"):
        ask["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        ask["memory"] = float(options["memory"])
    ask.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return {k: v for k, v in ask.items() if v > 0}


def _labels_match(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    for key, want in (selector or {}).items():
        have = labels.get(key)
        if want.startswith("!"):
            if have == want[1:]:
                return False
        elif want.startswith("in(") and want.endswith(")"):
            if have not in [v.strip() for v in want[3:-1].split(",")]:
                return False
        elif have != want:
            return False
    return True


def unplaceable(serve_config: Mapping, nodes: Iterable[Mapping]) -> list[str]:
    """One message per deployment of `serve_config` whose replica fits no node of `nodes` (each
    {"resources_total": {...}, "labels": {...}, "state": "ALIVE"}); empty when every one fits."""
    alive = [n for n in nodes if n.get("state", "ALIVE") == "ALIVE"]
    problems = []
    for app in serve_config.get("applications", []):
        for dep in app.get("deployments", []) or []:
            options = dep.get("ray_actor_options") or {}
            ask = replica_ask(options)
            selectors = [options.get("label_selector")] + [
                f.get("label_selector") for f in options.get("fallback_strategy") or []]
            fits = any(_labels_match(sel, n.get("labels") or {})
                       and all(float((n.get("resources_total") or {}).get(k, 0)) >= v for k, v in ask.items())
                       for n in alive for sel in selectors)
            if not fits:
                biggest = {k: max((float((n.get("resources_total") or {}).get(k, 0)) for n in alive), default=0)
                           for k in ask}
                where = " or ".join(str(s) for s in selectors if s) or "any node"
                problems.append(
                    f"deployment {dep['name']!r} of application {app.get('name', '?')!r} cannot be placed: one "
                    f"replica asks for {ask} on {where}, and no alive node of the cluster offers it (the largest "
                    f"offers {biggest}); Serve would leave it PENDING forever")
    return problems

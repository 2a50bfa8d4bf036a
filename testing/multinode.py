"""A real multi-node Ray cluster on this one machine, for tests and benchmarks: the head of `RayCluster` plus worker
nodes, each a separate raylet started with `ray start --address=<head>` in a temp dir of its own, with its own
logical CPUs, custom resources and a node label (`lightray.io/pool`), as the pods of a KubeRay worker group are.

A node is killed the way a machine dies: SIGKILL to its raylet, its workers and its agents, found by the node's
temp dir on their command lines (every process a raylet starts names it), so nothing of another node or another
cluster on the machine is touched. `restart_node` starts it again under the same name and labels.

configs/serve/multinode.yaml places the stages by label: the Ingress on the head (`ingress`), the TextEncoder and
VaeDecoder on the `text-vae` node, the Denoiser on the `denoiser` node (falling back to the `text-vae` node when
no `denoiser` node is alive), so every request crosses three nodes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from testing.local_cluster import BIN, REPO, RayCluster, free_ports, pids_naming
from testing.sse import parse_sse

POOL_LABEL = "lightray.io/pool"
MULTINODE_CONFIG = REPO / "configs/serve/multinode.yaml"

# The default layout: head + two workers. CPUs are logical (the machine has 2 cores for everything); each node
# declares enough for every replica configs/serve/multinode.yaml may place on it, the Denoiser's fallback included.
DEFAULT_WORKERS = {"text-vae": {"num_cpus": 2}, "denoiser": {"num_cpus": 2}}


@dataclass
class WorkerNode:
    name: str
    num_cpus: float
    labels: dict[str, str]
    resources: dict[str, float] = field(default_factory=dict)
    temp_dir: str = ""
    node_id: str | None = None
    """Ray's node id of the node's current raylet (a restarted node gets a new one)."""


class MultiNodeCluster(RayCluster):
    """`RayCluster`'s head (labelled `ingress`) plus worker nodes. `start()` starts the head and every worker of
    `workers` (name → {"num_cpus", "resources"}; the label is `lightray.io/pool=<name>`) and waits until Ray sees
    them all alive."""

    def __init__(self, workers: dict[str, dict] | None = None, head_cpus: float = 1, **kwargs):
        super().__init__(num_cpus=head_cpus, **kwargs)
        self.workers: dict[str, WorkerNode] = {}
        for name, spec in (DEFAULT_WORKERS if workers is None else workers).items():
            self.workers[name] = WorkerNode(name, spec.get("num_cpus", 1), {POOL_LABEL: name},
                                            dict(spec.get("resources", {})))

    def start(self) -> "MultiNodeCluster":
        self._head_extra = [f"--labels={POOL_LABEL}=ingress", "--node-name=head"]
        super().start()
        for node in self.workers.values():
            self._start_worker(node)
        self.wait_nodes(set(self.workers))
        return self

    def run(self, *args: str, timeout: float = 300, check: bool = True):
        # The head's `ray start` gets its label and name (RayCluster.start builds the rest of its command line).
        if args[1:3] == ("start", "--head"):
            args = (*args, *getattr(self, "_head_extra", ()))
        return super().run(*args, timeout=timeout, check=check)

    def _start_worker(self, node: WorkerNode) -> None:
        node.temp_dir = tempfile.mkdtemp(prefix=f"lrn-{node.name[:4]}-", dir="/tmp")
        names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port")
        ports = dict(zip(names, free_ports(len(names))))
        labels = ",".join(f"{k}={v}" for k, v in node.labels.items())
        args = [str(BIN / "ray"), "start", f"--address={self.address}", f"--num-cpus={node.num_cpus}",
                f"--labels={labels}", f"--node-name={node.name}", f"--temp-dir={node.temp_dir}",
                "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
        if node.resources:
            import json

            args.append(f"--resources={json.dumps(node.resources)}")
        self.run(*args)

    # -- what Ray sees ------------------------------------------------------------------------------------------

    def nodes(self, timeout: float = 10) -> list[dict]:
        """Every node Ray knows (alive and dead): node_id, node_name, state, labels, resources_total."""
        r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100, "detail": "true"},
                      timeout=timeout)
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]

    def alive_nodes(self) -> dict[str, str]:
        """Node name → node id of every ALIVE node (the head is `head`)."""
        return {n["node_name"]: n["node_id"] for n in self.nodes() if n["state"] == "ALIVE"}

    def wait_nodes(self, names: set[str], timeout: float = 120) -> None:
        deadline = time.time() + timeout
        alive: dict[str, str] = {}
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError, KeyError):
                alive = self.alive_nodes()
                if names <= set(alive):
                    for name in names:
                        self.workers[name].node_id = alive[name]
                    return
            time.sleep(1)
        raise TimeoutError(f"nodes {sorted(names - set(alive))} not alive after {timeout}s (alive: {alive})")

    def node_names(self) -> dict[str, str]:
        """Node id → node name, dead nodes included (a replica's `node_id` from Serve names its node here)."""
        return {n["node_id"]: n["node_name"] for n in self.nodes()}

    def stage_nodes(self, app: str = "lightray") -> dict[str, list[str]]:
        """Deployment → the names of the nodes its RUNNING replicas are on (sorted, one entry per replica)."""
        names = self.node_names()
        return {dep: sorted(names.get(r.get("node_id"), r.get("node_id") or "?") for r in reps
                            if r["state"] == "RUNNING")
                for dep, reps in self.replicas(app).items()}

    # -- faults -------------------------------------------------------------------------------------------------

    def node_pids(self, name: str) -> list[int]:
        """The node's processes: those naming its temp dir (raylet, log monitor) and all their descendants (the
        raylet's workers, replicas among them, and its agents)."""
        roots = set(pids_naming(self.workers[name].temp_dir))
        children: dict[int, list[int]] = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(proc.name))
        pids, stack = set(), list(roots)
        while stack:
            pid = stack.pop()
            if pid not in pids:
                pids.add(pid)
                stack.extend(children.get(pid, []))
        return sorted(pids)

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL every process of worker node `name` (raylet, workers, agents, log monitor): a machine gone.
        Returns the pids killed."""
        pids = self.node_pids(name)
        assert pids, f"no processes found for node {name}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def wait_node_dead(self, name: str, timeout: float = 120) -> float:
        """Seconds until Ray marks the node's last raylet DEAD (health checks: a few seconds to ~30 s)."""
        node_id = self.workers[name].node_id
        start = time.time()
        while time.time() - start < timeout:
            with contextlib.suppress(httpx.HTTPError):
                state = {n["node_id"]: n["state"] for n in self.nodes()}
                if state.get(node_id) == "DEAD":
                    return time.time() - start
            time.sleep(0.5)
        raise TimeoutError(f"node {name} ({node_id}) not DEAD after {timeout}s")

    def restart_node(self, name: str) -> None:
        """Starts worker `name` again (a new raylet, a new node id) and waits until it is alive."""
        node = self.workers[name]
        with contextlib.suppress(Exception):
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        old = node.node_id
        self._start_worker(node)
        deadline = time.time() + 120
        while time.time() < deadline:
            alive = {n["node_name"]: n["node_id"] for n in self.nodes()
                     if n["state"] == "ALIVE" and n["node_id"] != old}
            if name in alive:
                node.node_id = alive[name]
                return
            time.sleep(1)
        raise TimeoutError(f"node {name} did not rejoin")

    # -- teardown -----------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ends the workers' processes, then the head's (each found by its own temp dir), never another cluster's."""
        for node in self.workers.values():
            if node.temp_dir:
                for pid in pids_naming(node.temp_dir):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(pids_naming(n.temp_dir) for n in self.workers.values()
                                             if n.temp_dir):
            time.sleep(0.5)
        for node in self.workers.values():
            if node.temp_dir:
                for pid in pids_naming(node.temp_dir):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
                shutil.rmtree(node.temp_dir, ignore_errors=True)
        super().stop()


# -- load for tests and benchmarks ----------------------------------------------------------------------------------

CLIENT_TIMEOUT_S = 120
"""Clients wait past any service's request timeout here: a hang shows as an exception, not a client give-up."""


def post(url: str, body: dict, timeout: float = CLIENT_TIMEOUT_S) -> httpx.Response | Exception:
    try:
        return httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout)
    except httpx.HTTPError as err:
        return err



class ClosedLoad:
    """Closed-loop load from `threads` clients: each sends `bodies()[i % len]` in turn until stopped, recording
    (sent_at, label, response or exception, seconds)."""

    def __init__(self, url: str, bodies, threads: int = 3):
        self.url, self.bodies, self.threads = url, bodies, threads
        self.results: list[tuple[float, str, httpx.Response | Exception, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads)
        self._futures = []

    def _client(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            bodies = self.bodies()
            label, body = bodies[i % len(bodies)]
            i += self.threads
            t0 = time.monotonic()
            if body.get("stream"):
                r = stream(self.url, body)
            else:
                r = post(self.url, body)
            with self._lock:
                self.results.append((t0, label, r, time.monotonic() - t0))

    def __enter__(self) -> "ClosedLoad":
        self._futures = [self._pool.submit(self._client, k) for k in range(self.threads)]
        return self

    def stop(self) -> None:
        self._stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def sent(self) -> int:
        with self._lock:
            return len(self.results)


def stream(url: str, body: dict, timeout: float = CLIENT_TIMEOUT_S):
    """A streamed request: (status, events) or the exception. A 200 stream ends in `completed` or `error`."""
    try:
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=timeout) as r:
            raw = r.read().decode()
            if r.status_code != 200:
                return r
            return ("stream", parse_sse(raw))
    except httpx.HTTPError as err:
        return err


def status(r) -> str:
    if isinstance(r, Exception):
        return f"exception {type(r).__name__}"
    if isinstance(r, tuple):
        events = r[1]
        last = events[-1][1] if events else {}
        return "200 stream completed" if str(last.get("type", "")).endswith("completed") else "200 stream error"
    return str(r.status_code)


STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")
"""The graph's stage deployments, each of which must be placed again after a node is lost."""


def kill_under_load(cluster: MultiNodeCluster, load: ClosedLoad, node: str, timeout_s: float = 240
                    ) -> tuple[list[int], float, float, float | None]:
    """Kill `node` while `load` runs and wait until every stage is placed again and a request sent after Ray marked
    the node dead got a 200: (the pids killed, when (monotonic), seconds until the node was dead, seconds from the
    kill until every stage served again, None if not within `timeout_s`)."""
    pids = cluster.kill_node(node)
    killed_at = time.monotonic()
    dead_after = cluster.wait_node_dead(node)
    while time.monotonic() - killed_at < timeout_s:
        placed = cluster.stage_nodes()
        if all(placed.get(stage) for stage in STAGES):
            with load._lock:
                after = [r for sent, _, r, _ in load.results if sent > killed_at + dead_after]
            if any(isinstance(r, httpx.Response) and r.status_code == 200 for r in after):
                return pids, killed_at, dead_after, time.monotonic() - killed_at
        time.sleep(1)
    return pids, killed_at, dead_after, None

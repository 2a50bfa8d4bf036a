"""A real local Ray cluster (for tests and benchmarks): `ray start --head` in a private temp dir, the Serve YAML
deployed with `serve deploy` (the same path a user takes), torn down with `ray stop`.

Ports are picked free on loopback, so a user's `make serve` on :8000 does not collide with the tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from lightray.ray_env import with_ray_defaults

REPO = Path(__file__).resolve().parent.parent  # repository root
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: all held open at once while picking, so the OS cannot hand out the same
    port twice (one `free_port()` after another can)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """This process's environment with Lightray's Ray defaults (`lightray.ray_env`) and the repository on the
    path of every process the cluster starts."""
    env = with_ray_defaults(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class RayCluster:
    def __init__(self, num_cpus: int = 2, metrics_report_interval_ms: int | None = None):
        """`metrics_report_interval_ms`: how often processes push metrics to the node's exporter (Ray's
        `RAY_metrics_report_interval_ms`, default 10 s; tests shorten it to see series sooner)."""
        self.num_cpus = num_cpus
        # Short path: Ray puts unix sockets under it and their paths are length-limited.
        self.temp_dir = tempfile.mkdtemp(prefix="lrt-", dir="/tmp")
        agents = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                  "metrics-export-port", "ray-client-server-port")
        self.gcs_port, self.dashboard_port, self.http_port, *agent_ports = free_ports(3 + len(agents))
        # Every other port a head node listens on, picked free too: the defaults (dashboard agent 52365, client
        # server 10001, ...) belong to whichever cluster on the machine took them first, and a second cluster
        # started with them runs without a job agent ("No available agent to submit job").
        self.agent_ports = dict(zip(agents, agent_ports))
        self.metrics_port = self.agent_ports["metrics-export-port"]
        self.env = ray_env()
        self.deployed_config: Path | None = None
        """The Serve YAML `deploy` last deployed (`config_with_application` adds to it)."""
        if metrics_report_interval_ms is not None:
            self.env["RAY_metrics_report_interval_ms"] = str(metrics_report_interval_ms)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """The head node's Prometheus endpoint (every process's Ray and Serve metrics, the app's own included)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def serve_log_dir(self) -> Path:
        """Where Serve writes its controller, proxy and replica logs (replica_<app>_<deployment>_<id>.log)."""
        return Path(self.temp_dir) / "session_latest" / "logs" / "serve"

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def start(self, attempts: int = 2) -> "RayCluster":
        """`ray start` the head; a start that fails (on a loaded host the GCS can miss `ray start`'s deadline) leaves
        processes behind, which are ended before the next attempt or the error."""
        for attempt in range(1, attempts + 1):
            try:
                self.run(
                    str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                    f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                    *(f"--{name}={port}" for name, port in self.agent_ports.items()),
                )
                break
            except RuntimeError:
                self._end_own_processes()
                if attempt == attempts:
                    raise
        self.env["RAY_ADDRESS"] = self.address
        self._wait_for_dashboard()
        return self

    def _wait_for_dashboard(self, timeout: float = 180) -> None:
        """`ray start` returns before the dashboard (which `serve deploy` and `ray job submit` talk to) listens."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.dashboard_url}/api/version", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"Ray dashboard not up at {self.dashboard_url} after {timeout}s")

    def stop(self) -> None:
        """Ends this cluster's processes only. (`ray stop` would end every Ray cluster on the machine, a user's
        `make serve` included.) Every process of the cluster names its temp dir on its command line."""
        self._end_own_processes()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _end_own_processes(self) -> None:
        self._signal_own_processes(signal.SIGTERM)
        deadline = time.time() + 15
        while time.time() < deadline and self._own_processes():
            time.sleep(0.5)
        self._signal_own_processes(signal.SIGKILL)

    def _own_processes(self) -> list[int]:
        return pids_naming(self.temp_dir)

    def _signal_own_processes(self, sig: int) -> None:
        for pid in self._own_processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def serve_config(self, config: Path, args: dict | None = None, deployments: dict | None = None) -> Path:
        """A copy of a Serve YAML with this cluster's HTTP port and `args` / per-deployment overrides merged. The
        settings of deployments that the merged args no longer serve (an `extra_presets` left out) are dropped:
        Serve refuses settings for a deployment the application does not have."""
        from lightray.config import load_preset
        from serve_app.app import stage_name

        data = yaml.safe_load(config.read_text())
        data["http_options"] = {**data.get("http_options", {}), "host": "127.0.0.1", "port": self.http_port}
        app = data["applications"][0]
        app["args"] = {**app.get("args", {}), **(args or {})}
        presets = [load_preset(ref) for ref in [app["args"]["preset"], *app["args"].get("extra_presets", [])]]
        served = {"Ingress"} | {stage_name(stage, preset, i) for i, preset in enumerate(presets)
                                for stage in ("TextEncoder", "Denoiser", "VaeDecoder")}
        app["deployments"] = [d for d in app.get("deployments", []) if d["name"] in served]
        for dep in app.get("deployments", []):
            dep.update((deployments or {}).get(dep["name"], {}))
        out = Path(self.temp_dir) / f"serve-{config.stem}.yaml"
        out.write_text(yaml.safe_dump(data, sort_keys=False))
        return out

    def deploy(self, config: Path, timeout: float = 600, ready_path: str = "/readyz") -> None:
        """`serve deploy` of `config`, then wait until `ready_path` (an application's readiness URL) answers 200."""
        self.check_placement(config)
        # The first deploy also starts Serve's controller and proxies; on a loaded 2-core machine that can
        # outlast the CLI's 60 s wait ("HTTP proxies not available"), and the next attempt finds them up.
        for attempt in range(3):
            result = self.run(str(BIN / "serve"), "deploy", str(config), "-a", self.dashboard_url, check=attempt == 2)
            if result.returncode == 0:
                break
        self.deployed_config = config
        self.wait_ready(timeout, ready_path)

    def check_placement(self, config: Path) -> None:
        """Refuses (ValueError naming the deployments) a config with a replica that fits no alive node of this
        cluster: Serve would leave it PENDING forever (`lightray.placement`)."""
        from lightray.placement import unplaceable

        r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100, "detail": "true"}, timeout=30)
        r.raise_for_status()
        problems = unplaceable(yaml.safe_load(config.read_text()), r.json()["data"]["result"]["result"])
        if problems:
            raise ValueError("; ".join(problems))

    def config_with_application(self, application: dict) -> Path:
        """A copy of the Serve YAML last deployed here with one more application (its own `name` and
        `route_prefix`). Deploying it leaves the deployed applications' replicas running: Serve rebuilds an
        application only when its code version (import path, args, runtime env) changes, and theirs do not. So a
        test serves another graph on a session's cluster instead of starting a cluster of its own (about a minute
        on 2 cores), and deploys `deployed_config` again afterwards to take it away."""
        data = yaml.safe_load(self.deployed_config.read_text())
        data["applications"] = [*data["applications"], application]
        out = Path(self.temp_dir) / f"serve-with-{application['name']}.yaml"
        out.write_text(yaml.safe_dump(data, sort_keys=False))
        return out

    def serve_details(self, timeout: float = 10) -> dict:
        """Serve's own view of the cluster (`GET /api/serve/applications/`, what `serve status` reads):
        applications → deployments → replicas, each with its `state`, `pid` and `actor_id`."""
        r = httpx.get(f"{self.dashboard_url}/api/serve/applications/", timeout=timeout)
        r.raise_for_status()
        return r.json()

    def replicas(self, app: str = "lightray", timeout: float = 10) -> dict[str, list[dict]]:
        """Deployment name → its replicas as Serve reports them (every state; filter on `state == "RUNNING"`)."""
        deployments = self.serve_details(timeout)["applications"].get(app, {}).get("deployments", {})
        return {name: list(dep.get("replicas", [])) for name, dep in deployments.items()}

    def wait_ready(self, timeout: float = 300, path: str = "/readyz") -> None:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.http_url}{path}", timeout=5)
                last = r.text
                if r.status_code == 200:
                    return
            time.sleep(1)
        status = self.run(str(BIN / "serve"), "status", "-a", self.dashboard_url, check=False).stdout
        raise TimeoutError(f"service not ready after {timeout}s: {last}\n{status}")


def pids_naming(text: str) -> list[int]:
    """The pids of this machine's processes (this one aside) whose command line contains `text`: a cluster's
    processes all name its temp dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(proc.name))
    return pids

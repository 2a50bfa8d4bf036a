"""One source for each setting, with its precedence: the service settings (constructor > environment > default),
the registry's location and storage options (the same object for the service, the CLI and the training job, one
meaning of a relative path), Ray's environment defaults (written once), and Serve deployment options (the YAML
only: a decorator option the YAML also sets would be silently overridden)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from pathlib import Path

import pytest

from lightray.config import REPO_ROOT
from lightray.ray_env import RAY_ENV_DEFAULTS, with_ray_defaults
from lightray.registry_settings import DEFAULT_REGISTRY, RegistrySettings, open_registry, resolve_registry_root
from serve_app.settings import ServiceSettings

NO_AUTH = {"auth_enabled": False}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in ("LIGHTRAY_REGISTRY", "LIGHTRAY_REGISTRY_STORAGE_OPTIONS", "LIGHTRAY_REQUEST_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)


def test_service_settings_take_constructor_arguments_over_the_environment_over_defaults(monkeypatch):
    """What serve_app/settings.py documents: the Serve YAML's `args` (constructor keywords) win over LIGHTRAY_*."""
    default = ServiceSettings.model_fields["request_timeout_s"].default
    assert ServiceSettings(**NO_AUTH).request_timeout_s == default
    monkeypatch.setenv("LIGHTRAY_REQUEST_TIMEOUT_S", "5")
    assert ServiceSettings(**NO_AUTH).request_timeout_s == 5
    assert ServiceSettings(**NO_AUTH, request_timeout_s=7).request_timeout_s == 7


def test_registry_settings_take_constructor_arguments_over_the_environment_over_defaults(monkeypatch, tmp_path):
    assert RegistrySettings().registry == DEFAULT_REGISTRY
    assert RegistrySettings().registry_storage_options == {}
    monkeypatch.setenv("LIGHTRAY_REGISTRY", str(tmp_path / "from-env"))
    monkeypatch.setenv("LIGHTRAY_REGISTRY_STORAGE_OPTIONS", json.dumps({"auto_mkdir": True}))
    assert RegistrySettings().registry == str(tmp_path / "from-env")
    assert RegistrySettings().registry_storage_options == {"auto_mkdir": True}
    explicit = RegistrySettings(registry=str(tmp_path / "given"), registry_storage_options={"auto_mkdir": False})
    assert (explicit.registry, explicit.registry_storage_options) == (str(tmp_path / "given"), {"auto_mkdir": False})
    # Mappings are merged key by key (pydantic-settings' deep update), the constructor winning per key: an empty
    # mapping does not clear what the environment sets.
    assert RegistrySettings(registry_storage_options={}).registry_storage_options == {"auto_mkdir": True}
    assert RegistrySettings(registry_storage_options={"anon": True}).registry_storage_options == {
        "auto_mkdir": True, "anon": True}
    # The service reads the same variables through the same fields.
    service = ServiceSettings(**NO_AUTH)
    assert (service.registry, service.registry_storage_options) == (str(tmp_path / "from-env"), {"auto_mkdir": True})


def test_malformed_storage_options_in_the_environment_name_the_field(monkeypatch):
    monkeypatch.setenv("LIGHTRAY_REGISTRY_STORAGE_OPTIONS", "{oops")
    with pytest.raises(ValueError, match="registry_storage_options"):
        RegistrySettings()


def test_a_relative_registry_means_the_same_folder_to_the_service_the_cli_and_the_job(monkeypatch, tmp_path):
    from jobs.train_lora import open_registry as job_registry
    from lightray.adapters_cli import registry_from_args
    from lightray.training.config import TrainConfig

    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    expected = str(REPO_ROOT / "registry")
    assert resolve_registry_root("./registry") == expected
    assert ServiceSettings(**NO_AUTH).open_registry().root_url == expected
    cli_default = registry_from_args(argparse.Namespace(registry=None, storage_options=None))
    cli_relative = registry_from_args(argparse.Namespace(registry="./registry", storage_options=None))
    assert cli_default.root_url == cli_relative.root_url == expected
    assert open_registry().root_url == expected
    job = TrainConfig.model_construct(registry="./registry", registry_storage_options=None)
    assert job_registry(job).root_url == expected
    assert resolve_registry_root("s3://bucket/prefix") == "s3://bucket/prefix"
    assert resolve_registry_root(str(tmp_path)) == str(tmp_path)


def test_ray_environment_defaults_are_written_once_and_the_callers_environment_wins():
    from testing.local_cluster import ray_env

    assert with_ray_defaults({}) == dict(RAY_ENV_DEFAULTS)
    assert with_ray_defaults({"RAY_AUTH_MODE": "token"})["RAY_AUTH_MODE"] == "token"
    env = ray_env()
    assert {name: env[name] for name in RAY_ENV_DEFAULTS} == {
        name: os.environ.get(name, default) for name, default in RAY_ENV_DEFAULTS.items()}
    for path in ("Makefile", "lightray/cli.py", "testing/local_cluster.py"):
        text = (REPO_ROOT / path).read_text()
        assert not [name for name in RAY_ENV_DEFAULTS if name in text], f"{path} repeats a Ray default"


def test_the_container_image_runs_ray_serves_data_plane_as_lightray_does():
    from lightray.ray_env import RAY_SERVE_DATA_PLANE

    dockerfile = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")  # continuation lines joined
    image_env = dict(pair for line in dockerfile.splitlines() if line.startswith("ENV ")
                     for pair in re.findall(r"(\w+)=(\S+)", line))
    assert {name: image_env.get(name) for name in RAY_SERVE_DATA_PLANE} == dict(RAY_SERVE_DATA_PLANE)
    assert set(RAY_SERVE_DATA_PLANE) <= set(RAY_ENV_DEFAULTS)


def _deployment_decorator_options(path: Path) -> dict[str, set[str]]:
    """Deployment name → the keyword options of its `@serve.deployment(...)` decorator in `path`."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        for deco in node.decorator_list:
            if isinstance(deco, ast.Call) and ast.unparse(deco.func) == "serve.deployment":
                found[node.name] = {kw.arg for kw in deco.keywords}
    return found


def test_deployment_options_live_in_the_serve_yaml_only():
    """Serve's YAML overrides decorator options without a word, so a decorator carries only the name the YAML
    refers to; replica counts, `max_ongoing_requests` and actor options are the YAML's."""
    decorated = {}
    for path in [*(REPO_ROOT / "deployments").glob("*.py"), REPO_ROOT / "serve_app/app.py"]:
        decorated |= _deployment_decorator_options(path)
    assert set(decorated) == {"Ingress", "TextEncoder", "Denoiser", "VaeDecoder"}
    assert all(options == {"name"} for options in decorated.values()), decorated


def test_a_failed_ray_start_is_cleaned_up_and_tried_again(monkeypatch):
    """A `ray start` that misses its deadline on a loaded host leaves its GCS and dashboard running: the harness
    ends them, then starts again, once."""
    from testing.local_cluster import RayCluster

    calls: list[str] = []

    def run(self, *args, **kwargs):
        calls.append("start")
        if calls.count("start") == 1:
            raise RuntimeError("ray start failed (1): The current node timed out during startup.")

    monkeypatch.setattr(RayCluster, "run", run)
    monkeypatch.setattr(RayCluster, "_end_own_processes", lambda self: calls.append("cleanup"))
    monkeypatch.setattr(RayCluster, "_wait_for_dashboard", lambda self: calls.append("dashboard"))
    cluster = RayCluster()
    try:
        cluster.start()
    finally:
        os.rmdir(cluster.temp_dir)
    assert calls == ["start", "cleanup", "start", "dashboard"]
    calls.clear()
    monkeypatch.setattr(RayCluster, "run", lambda self, *a, **k: calls.append("start") or (_ for _ in ()).throw(
        RuntimeError("ray start failed")))
    cluster = RayCluster()
    try:
        with pytest.raises(RuntimeError, match="ray start failed"):
            cluster.start()
    finally:
        os.rmdir(cluster.temp_dir)
    assert calls == ["start", "cleanup", "start", "cleanup"]

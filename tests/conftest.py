"""Shared fixtures. Every test uses the shipped embedded model (models/lightray-shapes) unless
LIGHTRAY_TEST_PRESET names another preset file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lightray.config import ModelPreset, load_preset

pytest_plugins = ["conftest_registry"]

REPO = Path(__file__).resolve().parent.parent

# The test tiers (pyproject's markers; `make test-fast` runs `unit`). A test is marked `cluster` when it needs a
# Ray cluster or another real server, through these fixtures or its module's `pytestmark`; `browser` likewise;
# every test that is none of cluster, browser and slow is `unit`.
SERVER_FIXTURES = {"ray_cluster", "service", "s3_server", "s3_prefix"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)
        if not any(item.get_closest_marker(m) for m in ("cluster", "browser", "slow")):
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, as every Serve replica runs (OMP_NUM_THREADS=1): the same seed gives the
    same pixels for the same model, config and thread count, and 1 vs 2 threads can differ by a grey level."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def preset() -> ModelPreset:
    return load_preset(os.environ.get("LIGHTRAY_TEST_PRESET", "lightray-shapes"))


@pytest.fixture(scope="session")
def local_pipeline(preset):
    from lightray.pipeline import LocalPipeline

    return LocalPipeline(preset)


@pytest.fixture(scope="session")
def exact_vae(preset):
    """The preset's VAE as diffusers runs it (`vae_exact`), for tests that compare pixels with diffusers' pipelines
    bit for bit; everything else runs the single-frame VAE."""
    from lightray.stages import VaeStage

    return VaeStage(preset.model_copy(update={"vae_exact": True}))


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory) -> Path:
    """The adapter registry (a local folder) that both the in-process app and the Ray service read."""
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def api_client(local_pipeline, registry_root, tmp_path_factory) -> TestClient:
    """The real FastAPI app over the in-process pipeline: the HTTP contract without a cluster."""
    from serve_app.api import create_app
    from serve_app.local_backend import LocalBackend
    from serve_app.settings import ServiceSettings

    # Tests publish through registry objects of their own and expect the next request to use the new version at
    # once: without a latest cache, the service sees them as soon as they are committed.
    settings = ServiceSettings(
        preset=local_pipeline.preset.model_dump(), registry=str(registry_root), registry_cache_ttl_s=0,
        image_store_dir=str(tmp_path_factory.mktemp("images")), auth_enabled=False,
        # schemathesis's in-process client calls the app as "testserver" (tests/test_fuzz_api.py).
        local_hosts=["localhost", "127.0.0.1", "[::1]", "testserver"],
    )
    backend = LocalBackend(local_pipeline, settings.open_registry())
    with TestClient(create_app(backend, settings), base_url="http://localhost") as client:
        yield client


@pytest.fixture(scope="session")
def edit_pipeline():
    """The embedded instruction-edit model (configs/models/lightray-shapes-edit.yaml) in process."""
    from lightray.pipeline import LocalPipeline

    return LocalPipeline(load_preset("lightray-shapes-edit"))


@pytest.fixture(scope="session")
def make_app_with_edit_model(local_pipeline, edit_pipeline, tmp_path_factory):
    """Makes the real FastAPI app over two in-process backends: the embedded text-to-image model (the default) and
    the embedded edit model, as a service with `extra_presets: [lightray-shapes-edit]` serves them. Each call is a
    new app with its own registry folder (`app.state.settings.registry`) and image store: an app's admission state
    belongs to the event loop that serves it (a TestClient's, or a uvicorn thread's)."""
    from serve_app.api import create_app
    from serve_app.local_backend import LocalBackend
    from serve_app.settings import ServiceSettings

    def make():
        settings = ServiceSettings(
            preset=local_pipeline.preset.model_dump(), extra_presets=[edit_pipeline.preset.name],
            registry=str(tmp_path_factory.mktemp("edit-registry")), registry_cache_ttl_s=0,
            image_store_dir=str(tmp_path_factory.mktemp("edit-images")), auth_enabled=False)
        registry = settings.open_registry()
        return create_app([LocalBackend(local_pipeline, registry), LocalBackend(edit_pipeline, registry)], settings)

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    from testing.local_cluster import RayCluster

    # Metrics reported every second (Ray's default is 10 s): tests/test_observability.py scrapes them.
    cluster = RayCluster(metrics_report_interval_ms=1000).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def service(ray_cluster, preset, registry_root, tmp_path_factory):
    """configs/serve/local.yaml deployed with `serve deploy` on the test cluster; yields its base URL."""
    # Tests publish through registry objects of their own and expect the next request to use the new version at
    # once: without a latest cache, the service sees them as soon as they are committed.
    args = {"registry": str(registry_root), "registry_cache_ttl_s": 0,
            "image_store_dir": str(tmp_path_factory.mktemp("served-images"))}
    if os.environ.get("LIGHTRAY_TEST_PRESET"):
        args["preset"] = os.environ["LIGHTRAY_TEST_PRESET"]
    config = ray_cluster.serve_config(REPO / "configs/serve/local.yaml", args)
    ray_cluster.deploy(config)
    return ray_cluster.http_url

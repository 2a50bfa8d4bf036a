"""Qwen-Image-2.1 Turbo through the Ray Serve graph: the mini real-layout Turbo (`tests/mini_real.py`) served by its
own TextEncoder / Denoiser / VaeDecoder deployments and FastAPI ingress, as one more application on the session's
test cluster (`serve deploy`, real HTTP under its route prefix). A generation, an edit with a picture (multipart
`image[]`) and a streamed edit give the pixels the same requests give through the in-process `LocalBackend`.

The application is deployed beside configs/serve/local.yaml's (whose replicas keep running) and taken away after
the module, so the tests that follow find the session's service as they expect it."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mini_real import build_mini_real_21, mini_21_preset
from sse import parse_sse, pixels
from lightray.world.shapes import Scene, render
from testing.images import encoded

MODEL = "qwen-image-2.1-turbo"
ROUTE_PREFIX = "/qwen-image-2.1-turbo"
PROMPT = "make the circle blue"
REQUEST = {"model": MODEL, "prompt": PROMPT, "seed": "9", "size": "128x128"}
"""Turbo's 8 steps at the smallest size its previews are measured at (128²), one image."""
STAGES = ("Ingress", "TextEncoder", "Denoiser", "VaeDecoder")
STAGE_CPUS = 0.02
"""Each of the application's replicas' CPU share: configs/serve/local.yaml budgets 1.9 of the cluster's 2 CPUs
(its Denoisers scaled out), and Ray leaves pending a replica it cannot place."""


@pytest.fixture(scope="module")
def turbo_preset(tmp_path_factory):
    root = build_mini_real_21(tmp_path_factory.mktemp("mini-21") / "Qwen-Image-2.1-Turbo", turbo=True)
    return mini_21_preset(root, "qwen-image-2.1-turbo.yaml")


@pytest.fixture(scope="module")
def graph(service, ray_cluster, turbo_preset, tmp_path_factory):
    """An httpx client on the Turbo application's route prefix, deployed beside the session's service."""
    session_config = ray_cluster.deployed_config
    application = {
        "name": MODEL, "route_prefix": ROUTE_PREFIX, "import_path": "serve_app.app:build_app",
        "args": {"preset": turbo_preset.model_dump(mode="json"), "extra_presets": [],
                 "registry": str(tmp_path_factory.mktemp("registry-21")), "registry_cache_ttl_s": 0,
                 "image_store_dir": str(tmp_path_factory.mktemp("served-images-21")), "auth_enabled": False},
        "deployments": [{"name": name, "num_replicas": 1, "ray_actor_options": {"num_cpus": STAGE_CPUS}}
                        for name in STAGES],
    }
    session_ingress = session_ingress_replicas(ray_cluster)
    ray_cluster.deploy(ray_cluster.config_with_application(application), ready_path=f"{ROUTE_PREFIX}/readyz")
    assert session_ingress_replicas(ray_cluster) == session_ingress  # the session's application was not rebuilt
    try:
        with httpx.Client(base_url=f"{service}{ROUTE_PREFIX}", timeout=300) as client:
            yield client
    finally:
        ray_cluster.deploy(session_config)
    assert session_ingress_replicas(ray_cluster) == session_ingress


def session_ingress_replicas(ray_cluster) -> set[str]:
    """The session application's running Ingress replicas (a fixed count): a rebuilt application has new ones."""
    return {r["replica_id"] for r in ray_cluster.replicas()["Ingress"] if r["state"] == "RUNNING"}


@pytest.fixture(scope="module")
def in_process(turbo_preset, tmp_path_factory):
    """The same API over the in-process pipeline (`LocalBackend`), for the pixels the graph must give."""
    from lightray.pipeline import LocalPipeline
    from serve_app.api import create_app
    from serve_app.local_backend import LocalBackend
    from serve_app.settings import ServiceSettings

    settings = ServiceSettings(preset=turbo_preset.model_dump(), registry=str(tmp_path_factory.mktemp("registry")),
                               image_store_dir=str(tmp_path_factory.mktemp("images")), auth_enabled=False)
    backend = LocalBackend(LocalPipeline(turbo_preset), settings.open_registry())
    with TestClient(create_app(backend, settings), base_url="http://localhost") as client:
        yield client


def picture() -> Image.Image:
    """A 96×64 picture: not the output's size or aspect ratio, so the stages resize it to the output's area."""
    return render(Scene("red", "circle", "left", "white"), (96, 64))


def edit(client: httpx.Client, **fields) -> httpx.Response:
    return client.post("/v1/images/edits", data={**REQUEST, **fields},
                       files=[("image[]", ("in.png", encoded(picture()), "image/png"))])


def image_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 1
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))))


def test_a_generation_and_an_edit_through_the_graph_equal_the_in_process_backend(graph, in_process,
                                                                                 one_torch_thread):
    """At the replicas' one torch thread the graph's pixels are the in-process ones exactly; the edit's differ
    from the generation's (the picture reached the encoders)."""
    generation = {**REQUEST, "seed": 9}
    served = image_of(graph.post("/v1/images/generations", json=generation))
    assert served.shape == (128, 128, 4)
    assert np.array_equal(served, image_of(in_process.post("/v1/images/generations", json=generation)))
    edited = image_of(edit(graph))
    assert np.array_equal(edited, image_of(edit(in_process)))
    assert np.abs(edited.astype(int) - served.astype(int)).max() > 0


def test_a_streamed_edit_through_the_graph_sends_previews_then_the_image(graph, in_process, one_torch_thread):
    with graph.stream("POST", "/v1/images/edits", data={**REQUEST, "stream": "true", "partial_images": "2"},
                      files=[("image[]", ("in.png", encoded(picture()), "image/png"))]) as response:
        assert response.status_code == 200
        events = parse_sse("".join(response.iter_text()))
    partials = [data for kind, data in events if kind == "image_edit.partial_image"]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    assert all(pixels(p["b64_json"]).shape == (16, 16, 3) for p in partials)  # fast previews: an eighth of the side
    assert events[-1][0] == "image_edit.completed"
    # (`pixels` reads RGB: the image is RGBA, as the 2.1 pipeline decodes it)
    assert np.array_equal(pixels(events[-1][1]["b64_json"]), image_of(edit(in_process))[..., :3])

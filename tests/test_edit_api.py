"""Instruction edits through the HTTP API, in process: the real FastAPI app over two backends (the embedded
text-to-image model and the embedded edit model, `lightray-shapes-edit`), as `make serve` serves them. Bad input
gets a 4xx naming the field; the images are the in-process pipeline's for the same seed."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lightray.schemas import ImageEditRequest
from lightray.world.shapes import Scene, render
from testing.adapters import publish_placeholder_adapter

EDIT_MODEL = "lightray-shapes-edit"
SOURCE = Scene("red", "circle", "left", "white")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def edit_client(make_app_with_edit_model):
    app = make_app_with_edit_model()
    with TestClient(app, base_url="http://localhost") as client:
        client.registry_root = Path(app.state.settings.registry)
        yield client


def edit(client, images: list[Image.Image], prompt="make the circle blue", **fields):
    files = [("image[]", (f"in{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    data = {"model": EDIT_MODEL, "prompt": prompt, "seed": "3", **fields}
    return client.post("/v1/images/edits", data=data, files=files)


def decoded(response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in response.json()["data"]]


def assert_error(response, status: int, param: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_models_list_both_models_with_their_endpoints(edit_client):
    cards = {c["id"]: c for c in edit_client.get("/v1/models").json()["data"]}
    assert cards[EDIT_MODEL]["endpoints"] == ["edits"] and cards[EDIT_MODEL]["edit_mode"] == "instruction"
    assert cards[EDIT_MODEL]["input_images"] == [1, 3]
    assert cards["lightray-shapes-lightning-4"]["endpoints"] == ["generations", "edits"]
    assert cards["lightray-shapes-lightning-4"]["edit_mode"] == "img2img"


def test_an_edit_equals_the_in_process_pipeline_for_its_seed(edit_client, edit_pipeline):
    source = render(SOURCE, 128)
    response = edit(edit_client, [source], num_inference_steps="3")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "128x128" and body["model"] == EDIT_MODEL
    spec = ImageEditRequest(prompt="make the circle blue", model=EDIT_MODEL, seed=3, num_inference_steps=3,
                            size="128x128").resolve_instruction(edit_pipeline.preset, 0, [source.size])
    expected = edit_pipeline.instruct(spec, [source])[0]
    assert np.array_equal(np.asarray(decoded(response)[0]), np.asarray(expected))


def test_without_size_the_output_follows_the_last_images_aspect_ratio(edit_client):
    wide, tall = render(SOURCE, (192, 128)), render(SOURCE, (64, 96))
    response = edit(edit_client, [tall, wide], num_inference_steps="2")
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "192x128" and decoded(response)[0].size == (192, 128)
    # An input of a size the model does not serve is drawn at the served size nearest its aspect ratio.
    response = edit(edit_client, [render(SOURCE, (200, 90))], num_inference_steps="2")
    assert response.status_code == 200 and response.json()["size"] == "192x128"


def test_json_bodies_and_three_images(edit_client):
    images = [base64.b64encode(png(render(SOURCE, 64))).decode() for _ in range(3)]
    response = edit_client.post("/v1/images/edits", json={"model": EDIT_MODEL, "prompt": "把圆形变成蓝色",
                                                          "image": images, "num_inference_steps": 2, "n": 2})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2


def test_streaming_an_edit_sends_previews_then_the_image(edit_client):
    files = [("image", ("in.png", png(render(SOURCE, 64)), "image/png"))]
    data = {"model": EDIT_MODEL, "prompt": "make the background black", "stream": "true", "partial_images": "2",
            "num_inference_steps": "4"}
    with edit_client.stream("POST", "/v1/images/edits", data=data, files=files) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    assert text.count("event: image_edit.partial_image") == 2 and "event: image_edit.completed" in text


@pytest.mark.parametrize("count", [4, 6])
def test_more_than_three_images_is_a_400_naming_image(edit_client, count):
    assert_error(edit(edit_client, [render(SOURCE, 64)] * count), 400, "image")


def test_a_part_that_is_not_an_image_is_named(edit_client):
    files = [("image[]", ("a.png", png(render(SOURCE, 64)), "image/png")),
             ("image[]", ("b.png", png(render(SOURCE, 64)), "image/png")),
             ("image[]", ("c.txt", b"not an image at all", "text/plain"))]
    response = edit_client.post("/v1/images/edits", data={"model": EDIT_MODEL, "prompt": "make it blue"}, files=files)
    assert_error(response, 400, "image[2]")


def test_no_image_is_a_400_naming_image(edit_client):
    response = edit_client.post("/v1/images/edits", json={"model": EDIT_MODEL, "prompt": "make it blue"})
    assert_error(response, 400, "image")


def test_a_mask_with_an_instruction_model_is_a_400_naming_mask(edit_client):
    source = render(SOURCE, 64)
    files = [("image", ("in.png", png(source), "image/png")),
             ("mask", ("mask.png", png(Image.new("RGBA", source.size)), "image/png"))]
    response = edit_client.post("/v1/images/edits", data={"model": EDIT_MODEL, "prompt": "make it blue"}, files=files)
    assert_error(response, 400, "mask")


@pytest.mark.parametrize("field, value", [("strength", "0.5"), ("padding_mask_crop", "8"), ("mask_blur", "2")])
def test_img2img_fields_with_an_instruction_model_are_named(edit_client, field, value):
    assert_error(edit(edit_client, [render(SOURCE, 64)], **{field: value}), 400, field)


def test_generations_with_an_edit_only_model_is_a_400_naming_model(edit_client):
    response = edit_client.post("/v1/images/generations", json={"model": EDIT_MODEL, "prompt": "a red circle"})
    assert_error(response, 400, "model")
    # Without a model, generations go to the default (text-to-image) model, as before.
    response = edit_client.post("/v1/images/generations", json={"prompt": "a red circle", "num_inference_steps": 1,
                                                                "size": "64x64"})
    assert response.status_code == 200, response.text


def test_several_images_for_a_text_to_image_model_are_a_400_naming_image(edit_client):
    response = edit(edit_client, [render(SOURCE, 64)] * 2, model="lightray-shapes-lightning-4")
    assert_error(response, 400, "image")


def test_an_adapter_of_another_family_is_refused_naming_its_entry(edit_client, local_pipeline, tmp_path):
    adapter = publish_placeholder_adapter(edit_client.registry_root, local_pipeline.preset, "acme", "shapes-style",
                                          tmp_path)
    response = edit(edit_client, [render(SOURCE, 64)], lora=[adapter.ref])
    assert_error(response, 422, "lora")
    response = edit_client.post("/v1/images/edits", data={"model": EDIT_MODEL, "prompt": "make it blue",
                                                           "lora[]": [adapter.ref, adapter.ref.replace("@", "-x@")]},
                                files=[("image", ("in.png", png(render(SOURCE, 64)), "image/png"))])
    assert response.status_code in (404, 422) and response.json()["error"]["param"].startswith("lora")


def test_an_instruction_outside_the_grammar_still_returns_an_image(edit_client):
    response = edit(edit_client, [render(SOURCE, 64)], prompt="please do something nice 🙂 with this",
                    num_inference_steps="2")
    # Without `size`, the pipeline's rule: the default size's area (128²) at the input's aspect ratio.
    assert response.status_code == 200 and decoded(response)[0].size == (128, 128)

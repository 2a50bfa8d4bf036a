"""Image inputs (img2img and inpainting): the graph's stage functions reproduce diffusers' QwenImageImg2ImgPipeline
and QwenImageInpaintPipeline bit for bit; `POST /v1/images/edits` rejects bad uploads with a 4xx naming the field
and serves OpenAI's client; inpainting returns the input exactly outside the overlay's soft edge (`lightray.edits`)
unless `keep_unmasked` is off; on the trained embedded model, inpainting draws the prompt inside the mask, and
img2img strength moves the output from the input towards the prompt.

Exactness and API contracts run small (64x64, a served size; 2–4 steps, n ≤ 2): the suite shares a 2-core machine.
What the trained model draws from an input is checked at the default size (128x128).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import statistics
import struct
import zlib

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageImg2ImgPipeline, QwenImageInpaintPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_img2img, pipeline_qwenimage_inpaint
from PIL import Image, ImageFilter

from lightray.edits import OVERLAY_EDGE_PX, compose_edit, overlay_mask, prepare_edit
from lightray.images import load_edit_inputs, resize_for_model
from lightray.errors import RequestError
from lightray.contracts import denoising_steps
from lightray.schemas import ImageEditRequest
from lightray.world.evaluator import parse_prompt, score
from lightray.world.shapes import Scene, render

PROMPT = "a blue square on the right, white background"
SOURCE_SCENE = Scene("red", "circle", "left", "white")


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def openai_mask(edit: Image.Image) -> Image.Image:
    """OpenAI's mask for an "L" edit area (255 = edit): transparent there, opaque elsewhere."""
    alpha = edit.point(lambda v: 0 if v else 255)
    mask = Image.new("RGBA", edit.size, (0, 0, 0, 255))
    mask.putalpha(alpha)
    return mask


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    return m


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return render(Scene("red", "circle", "left", "white"), 64)


# ----------------------------------------------------------------------------- bit-exactness with diffusers

@pytest.fixture(scope="module")
def reference(local_pipeline):
    """diffusers' own img2img and inpaint pipelines, loaded from the model folder, with the Lightning LoRAs of the
    preset's variants loaded under their variant ids."""
    preset = local_pipeline.preset
    pipes = {}
    for kind, cls in (("img2img", QwenImageImg2ImgPipeline), ("inpaint", QwenImageInpaintPipeline)):
        pipe = cls.from_pretrained(preset.root).to(preset.device)
        pipe.set_progress_bar_config(disable=True)
        # As TextEncodeStage does; the VAE is loaded, so the pipeline's vae_scale_factor is already the real one.
        pipe.prompt_template_encode_start_idx = local_pipeline.text.pipe.prompt_template_encode_start_idx
        assert pipe.vae_scale_factor == preset.vae_scale_factor
        for v in preset.variants:
            if v.lightning_lora:
                pipe.load_lora_weights(str(preset.resolve(v.lightning_lora)), adapter_name=v.id.replace(".", "_"))
        pipes[kind] = pipe
    return pipes


def _run_reference(pipe, preset, spec, image, mask, mode: str, monkeypatch, **kwargs) -> list[Image.Image]:
    variant = preset.variant(spec.model)
    if pipe.get_list_adapters():
        if variant.lightning_lora:
            pipe.enable_lora()
            pipe.set_adapters([variant.id.replace(".", "_")], [1.0])
        else:
            pipe.disable_lora()
    base = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(variant.scheduler or base.config)
    if mode == "argmax":  # what the preset's default mode means: the pipelines with argmax retrieval
        for module in (pipeline_qwenimage_img2img, pipeline_qwenimage_inpaint):
            monkeypatch.setattr(module, "retrieve_latents",
                                functools.partial(module.retrieve_latents, sample_mode="argmax"))
    extra = {**kwargs, **({} if mask is None else {"mask_image": mask})}
    try:
        return pipe(
            prompt=spec.prompt, negative_prompt=spec.negative_prompt, true_cfg_scale=spec.true_cfg_scale,
            image=[image] * len(spec.seeds) if len(spec.seeds) > 1 else image, strength=spec.strength, height=spec.height, width=spec.width,
            num_inference_steps=spec.num_inference_steps, num_images_per_prompt=len(spec.seeds),
            generator=[torch.Generator(preset.device).manual_seed(s) for s in spec.seeds], **extra,
        ).images
    finally:
        pipe.scheduler = base
        monkeypatch.undo()


def _run_graph(local_pipeline, vae, spec, image, mask, mode: str) -> list[Image.Image]:
    """The graph's stage functions, in the order the Ray graph calls them (text ∥ VAE encode → denoise → decode),
    with `vae` (the exact one: diffusers' pipelines run the 3D VAE)."""
    lp = local_pipeline
    start = vae.encode_for_seeds(resize_for_model(image, spec.width, spec.height), spec.seeds, spec.height,
                                    spec.width, mode=mode)
    m = None if mask is None else np.asarray(resize_for_model(mask, spec.width, spec.height))
    latents = lp.denoiser.denoise(spec.denoise_params(), lp.encode(spec), image=start, mask=m)
    return vae.decode(latents, spec.height, spec.width)


def _cases(preset):
    base = next((v.id for v in preset.variants if not v.lightning_lora), None)
    lightning = next((v.id for v in preset.variants if v.lightning_lora), None)
    cases = []
    if base:  # true CFG on, two seeds in one batch, strength trimming the schedule
        cases.append(dict(model=base, n=2, seed=11, num_inference_steps=4, true_cfg_scale=4.0, strength=0.7))
    if lightning:  # the Lightning LoRA active, the input resized from 96x96
        cases.append(dict(model=lightning, n=1, seed=5, size="64x64", strength=0.6))
    return cases


@pytest.mark.parametrize("mode", ["argmax", "sample"])
@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_graph_reproduces_diffusers_pipelines(local_pipeline, exact_vae, reference, picture, kind, mode, monkeypatch):
    preset = local_pipeline.preset
    cases = _cases(preset)
    assert cases
    for case in cases:
        image = picture if "size" not in case else picture.resize((96, 96), Image.Resampling.BICUBIC)
        mask = None
        if kind == "inpaint":
            mask = box_mask(image.size, (image.width // 2, image.height // 4, image.width, 3 * image.height // 4))
        spec = ImageEditRequest(prompt=PROMPT, **case).resolve(preset, 0, image.size, inpaint=mask is not None)
        ours = _run_graph(local_pipeline, exact_vae, spec, image, mask, mode)
        theirs = _run_reference(reference[kind], preset, spec, image, mask, mode, monkeypatch)
        assert len(ours) == len(theirs) == len(spec.seeds)
        for a, b in zip(ours, theirs):
            assert a.size == b.size == (spec.width, spec.height)
            assert np.abs(pixels(a) - pixels(b)).max() == 0, (kind, mode, case)


def test_padding_mask_crop_matches_diffusers(api_client, local_pipeline, reference, monkeypatch):
    """A large picture edited by the small model through a crop around the mask, pasted back (diffusers'
    `padding_mask_crop`): the API's answer is the pipeline's, and outside the mask it is the input exactly."""
    preset = local_pipeline.preset
    big = render(Scene("green", "square", "top", "gray"), 128)
    edit = box_mask(big.size, (72, 80, 100, 112))
    fields = {"prompt": PROMPT, "seed": "3", "size": "64x64", "padding_mask_crop": "8", "mask_blur": "2",
              "num_inference_steps": "2"}
    r = api_client.post("/v1/images/edits", data=fields, files={
        "image": ("in.png", png(big), "image/png"), "mask": ("mask.png", png(openai_mask(edit)), "image/png")})
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert out.size == big.size
    spec = ImageEditRequest(**fields).resolve(preset, 0, big.size, inpaint=True)
    blurred = reference["inpaint"].mask_processor.blur(edit, 2)  # what diffusers' docs do for a soft seam
    theirs = _run_reference(reference["inpaint"], preset, spec, big, blurred, preset.image_encode_mode, monkeypatch,
                            padding_mask_crop=8)[0]
    assert np.abs(pixels(out) - pixels(theirs)).max() == 0
    keep = np.asarray(blurred) == 0
    assert np.array_equal(pixels(out)[keep], pixels(big)[keep])
    # The in-process pipeline (the CLI's and the library's way in) prepares and composes the same way.
    ours = local_pipeline.edit(spec, big, edit)[0]
    assert ours.size == big.size and np.array_equal(pixels(ours), pixels(out))
    for field in ("padding_mask_crop", "mask_blur"):
        r = api_client.post("/v1/images/edits", data={**OK_FIELDS, field: "8"},
                            files={"image": ("in.png", png(big), "image/png")})
        assert r.status_code == 400 and r.json()["error"]["param"] == field


# ------------------------------------------------------------------------------ keep_unmasked overlay

def _blue_block_on_gray() -> tuple[Image.Image, Image.Image]:
    """A 64² gray picture with a blue block on the left, and the edit mask of its right half."""
    picture = Image.new("RGB", (64, 64), (128, 128, 128))
    picture.paste((30, 60, 220), (6, 14, 26, 50))
    return picture, box_mask((64, 64), (32, 0, 64, 64))


def test_overlay_edge_is_a_box_feather_of_the_documented_width_and_diffusers_apply_overlay(preset):
    picture, edit = _blue_block_on_gray()
    alpha = np.asarray(overlay_mask(edit, None))
    # Across the straight edge at x = 32: 0 up to 2 px before it, then 1/5 … 5/5 over 2 px either side.
    assert OVERLAY_EDGE_PX == 2
    assert alpha[10, 27:37].tolist() == [0, 0, 0, 51, 102, 153, 204, 255, 255, 255]
    assert np.array_equal(np.asarray(overlay_mask(edit, 0)), np.asarray(edit))  # mask_blur 0: a hard edge
    # The composition is diffusers' apply_overlay, with and without a crop box, to the bit.
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=16)
    output = render(Scene("green", "triangle", "right", "white"), 64)
    spec = ImageEditRequest(prompt=PROMPT).resolve(preset, 0, picture.size, inpaint=True)
    prepared = prepare_edit(picture, edit, spec)
    assert np.array_equal(pixels(compose_edit([output], prepared)[0]),
                          pixels(processor.apply_overlay(prepared.overlay, picture, output)))
    big = picture.resize((128, 128))
    big_edit = box_mask((128, 128), (80, 40, 120, 90))
    crop = ImageEditRequest(prompt=PROMPT, size="64x64", padding_mask_crop=4).resolve(
        preset, 0, big.size, inpaint=True)
    prepared = prepare_edit(big, big_edit, crop)
    assert prepared.image.size == (64, 64) and prepared.canvas.size == big.size
    assert np.array_equal(pixels(compose_edit([output], prepared)[0]),
                          pixels(processor.apply_overlay(prepared.overlay, big, output, prepared.box)))
    # keep_unmasked off with a crop: the whole crop box is the model's, the input elsewhere.
    raw = ImageEditRequest(prompt=PROMPT, size="64x64", padding_mask_crop=4, keep_unmasked=False).resolve(
        preset, 0, big.size, inpaint=True)
    prepared = prepare_edit(big, big_edit, raw)
    composed = pixels(compose_edit([output], prepared)[0])
    x, y, x2, y2 = prepared.box
    outside_box = np.ones((128, 128), bool)
    outside_box[y:y2, x:x2] = False
    assert np.array_equal(composed[outside_box], pixels(big)[outside_box])
    assert np.array_equal(composed[y:y2, x:x2], pixels(processor.resize(output, y2 - y, x2 - x, resize_mode="crop")))


def test_padding_mask_crop_output_pixels_are_budgeted(preset):
    request = ImageEditRequest(prompt=PROMPT, n=2, size="64x64", padding_mask_crop=8)
    assert request.resolve(preset, 0, (128, 128), inpaint=True, max_output_pixels=2 * 128 * 128)
    with pytest.raises(RequestError) as e:
        request.resolve(preset, 0, (128, 128), inpaint=True, max_output_pixels=2 * 128 * 128 - 1)
    assert e.value.param == "image" and "padding_mask_crop" in e.value.message


def test_inpainting_keeps_the_input_outside_the_masks_soft_edge(api_client):
    """Through the HTTP API: repainting the right half of a gray picture with a blue block on the left returns the
    left half exactly outside the overlay's soft edge; with `keep_unmasked` off it is what the model decoded, which
    near the mask is far from the input (this model's latents are 16 px tokens, and the decoder mixes the
    repainted ones into their neighbours: measured PSNR ≈ 15 dB, up to 225 levels off), and deep inside the mask
    the two agree."""
    picture, edit = _blue_block_on_gray()
    files = {"image": ("in.png", png(picture), "image/png"), "mask": ("mask.png", png(openai_mask(edit)), "image/png")}
    fields = {"prompt": PROMPT, "seed": "2", "num_inference_steps": "2"}

    def run(**extra) -> np.ndarray:
        r = api_client.post("/v1/images/edits", data={**fields, **extra}, files=files)
        assert r.status_code == 200, r.text
        return pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))

    kept, raw = run(), run(keep_unmasked="false")
    source = pixels(picture)
    outside = np.asarray(overlay_mask(edit, None)) == 0
    assert outside[:, :30].all() and not outside[:, 30:].any()
    assert np.array_equal(kept[outside], source[outside])
    assert psnr(raw[outside], source[outside]) < 35
    inside = np.asarray(overlay_mask(edit, None)) == 255
    assert inside[:, 34:].all() and np.array_equal(kept[inside], raw[inside])
    assert not np.array_equal(kept[inside], source[inside])  # the mask's area is repainted
    # The JSON body takes the field as a boolean; a form's other text is a 400 naming it.
    r = api_client.post("/v1/images/edits", json={**fields, "keep_unmasked": False,
                                                   "image": base64.b64encode(png(picture)).decode(),
                                                   "mask": base64.b64encode(png(openai_mask(edit))).decode()})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))), raw)
    r = api_client.post("/v1/images/edits", data={**fields, "keep_unmasked": "no"}, files=files)
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_unmasked"


def test_openapi_shows_keep_unmasked_in_both_edit_bodies(api_client):
    body = api_client.get("/openapi.json").json()["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    for content_type in ("multipart/form-data", "application/json"):
        field = body[content_type]["schema"]["properties"]["keep_unmasked"]
        assert field["type"] == "boolean" and field["default"] is True, (content_type, field)
        assert "mask" in field["description"]


@torch.no_grad()
def test_vae_encode_is_the_pipelines_image_latents(exact_vae, reference, picture, monkeypatch):
    """`VaeStage.encode` (posterior mean) and `encode_for_seeds(mode="sample")` against the pipelines' own
    `_encode_vae_image`, packed; the generator states after the draw match too."""
    vae, pipe = exact_vae, reference["img2img"]
    x = pipe.image_processor.preprocess(picture, height=64, width=64).unsqueeze(2).to(pipe.vae.dtype)
    c, h, w = pipe.latent_channels, x.shape[-2] // 8, x.shape[-1] // 8

    def pack(z):
        return pipe._pack_latents(z[:, :, 0], z.shape[0], c, h, w).float().numpy()

    g = torch.Generator().manual_seed(3)
    sampled = pack(pipe._encode_vae_image(x, generator=[g]))
    ours = vae.encode_for_seeds(picture, [3], 64, 64, mode="sample")
    assert np.array_equal(ours.latents, sampled)
    assert np.array_equal(ours.generator_states[0], g.get_state().numpy())

    monkeypatch.setattr(pipeline_qwenimage_img2img, "retrieve_latents",
                        functools.partial(pipeline_qwenimage_img2img.retrieve_latents, sample_mode="argmax"))
    mean = pack(pipe._encode_vae_image(x, generator=[torch.Generator().manual_seed(3)]))
    assert np.array_equal(vae.encode([picture]), mean)
    assert np.array_equal(vae.encode_for_seeds(picture, [3, 4], 64, 64, mode="argmax").latents, np.concatenate([mean] * 2))


def test_strength_quantisation_matches_get_timesteps(reference):
    pipe = reference["img2img"]
    for steps in (2, 4, 8, 30):
        pipe.scheduler.set_timesteps(steps, mu=1.0)
        for strength in (0.05, 0.2, 0.25, 0.5, 0.6, 0.75, 0.8, 0.99, 1.0):
            _, kept = pipe.get_timesteps(steps, strength, "cpu")
            assert denoising_steps(steps, strength) == kept


# ------------------------------------------------------------------------------------------- upload checks

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height grey pixels but carries almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_load_edit_inputs_converts_openai_masks_and_flattens_alpha():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red → white over white
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))
    edit = box_mask((32, 32), (8, 8, 24, 24))
    image, mask = load_edit_inputs(png(rgba), png(openai_mask(edit)))
    assert image.mode == "RGB" and image.getpixel((20, 5)) == (255, 255, 255) and image.getpixel((5, 5)) == (0, 0, 255)
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), np.asarray(edit))
    # Semi-transparent is not "fully transparent": only alpha == 0 marks the edit area.
    soft = openai_mask(edit)
    soft.putalpha(Image.new("L", (32, 32), 1))
    with pytest.raises(Exception, match="nothing to edit"):
        load_edit_inputs(png(rgba), png(soft))
    # Resizing here is what the pipelines' preprocessing does.
    from diffusers.image_processor import VaeImageProcessor

    big = render(Scene("green", "triangle", "top", "gray"), 96)
    assert np.array_equal(np.asarray(resize_for_model(big, 64, 48)),
                          np.asarray(VaeImageProcessor(vae_scale_factor=16).resize(big, 48, 64)))


OK_FIELDS = {"prompt": PROMPT, "num_inference_steps": "2"}


def _bad_uploads(picture: Image.Image) -> list:
    edit = box_mask((64, 64), (32, 16, 64, 48))
    good_mask = png(openai_mask(edit))
    good = png(picture)
    return [
        # (id, files, fields, status, param)
        ("not-an-image", {"image": b"hello, not a picture"}, {}, 400, "image"),
        ("empty", {"image": b""}, {}, 400, "image"),
        ("gif", {"image": png(picture, "GIF")}, {}, 400, "image"),
        ("bmp", {"image": png(picture, "BMP")}, {}, 400, "image"),
        ("truncated", {"image": good[: len(good) // 2]}, {}, 400, "image"),
        ("too-many-bytes", {"image": b"\x89PNG" + b"\0" * (10 * 1024 * 1024)}, {}, 413, "image"),
        ("too-many-pixels", {"image": _png_header_only(5000, 5000)}, {}, 400, "image"),
        ("decompression-bomb", {"image": _png_header_only(30000, 30000)}, {}, 400, "image"),
        # An input of a size the model does not serve is worked at the nearest served size, or refused by a preset
        # that accepts a range instead: tests/test_sizes.py.
        ("two-images", {"image": good, "image[]": good}, {}, 400, "image"),
        ("mask-not-image", {"image": good, "mask": b"GIF89a nonsense"}, {}, 400, "mask"),
        ("mask-size", {"image": good, "mask": png(openai_mask(edit).resize((32, 32)))}, {}, 400, "mask"),
        ("mask-no-alpha", {"image": good, "mask": png(edit)}, {}, 400, "mask"),
        ("mask-opaque", {"image": good, "mask": png(Image.new("RGBA", (64, 64), (0, 0, 0, 255)))}, {}, 400, "mask"),
        ("mask-jpeg", {"image": good, "mask": png(picture, "JPEG")}, {}, 400, "mask"),
        ("strength-0", {"image": good}, {"strength": "0"}, 400, "strength"),
        ("strength-1.5", {"image": good}, {"strength": "1.5"}, 400, "strength"),
        ("strength-text", {"image": good}, {"strength": "strong"}, 400, "strength"),
        ("n-0", {"image": good}, {"n": "0"}, 400, "n"),
        ("size", {"image": good}, {"size": "65x64"}, 400, "size"),
        ("seeds-n", {"image": good}, {"seeds[]": ["1", "2"]}, 400, "seeds"),
        ("model", {"image": good}, {"model": "dall-e-2"}, 404, "model"),
        ("unknown-field", {"image": good}, {"colour": "red"}, 400, "colour"),
        ("prompt-file", {"image": good, "prompt": b"a file"}, {}, 400, "prompt"),
        ("missing-image", {}, {}, 400, "image"),
        ("mask-good-image-bad", {"image": b"junk", "mask": good_mask}, {}, 400, "image"),
    ]


BAD_UPLOADS = _bad_uploads(render(Scene("red", "circle", "left", "white"), 64))


@pytest.mark.parametrize("name, files, fields, status, param", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_upload_is_4xx_naming_the_field(api_client, name, files, fields, status, param):
    multipart = [(k, (f"{k}.bin", v, "application/octet-stream")) for k, v in files.items()]
    r = api_client.post("/v1/images/edits", files=multipart or None, data={**OK_FIELDS, **fields})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param in err["message"], err


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": PROMPT}, 400, "image"),
        ({"prompt": PROMPT, "image": "!!not base64!!"}, 400, "image"),
        ({"prompt": PROMPT, "image": "https://example.com/cat.png"}, 400, "image"),
        ({"prompt": PROMPT, "image": "data:image/png,rawbytes"}, 400, "image"),
        ({"prompt": PROMPT, "image": 42}, 400, "image"),
        ({"prompt": PROMPT, "image": base64.b64encode(b"not an image").decode()}, 400, "image"),
        ({"prompt": PROMPT, "image": "PICTURE", "mask": "!!"}, 400, "mask"),
        ({"prompt": "", "image": "PICTURE"}, 400, "prompt"),
        ({"prompt": PROMPT, "image": "PICTURE", "strength": 2}, 400, "strength"),
    ],
)
def test_bad_json_is_4xx_naming_the_field(api_client, picture, body, status, param):
    body = {k: (base64.b64encode(png(picture)).decode() if v == "PICTURE" else v) for k, v in body.items()}
    r = api_client.post("/v1/images/edits", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_bodies(api_client):
    r = api_client.post("/v1/images/edits", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = api_client.post("/v1/images/edits", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = api_client.post("/v1/images/edits", content=b"hi", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = api_client.post("/v1/images/edits", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert 400 <= r.status_code < 500


# ---------------------------------------------------------------------------------------------- contract

def test_img2img_multipart_contract(api_client, picture):
    files = {"image": ("in.png", png(picture), "image/png")}
    data = {**OK_FIELDS, "n": "2", "seeds[]": ["9", "10"], "strength": "0.5"}
    r = api_client.post("/v1/images/edits", files=files, data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [9, 10]
    outs = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in body["data"]]
    assert all(o.format == "PNG" and o.size == picture.size for o in outs)
    again = api_client.post("/v1/images/edits", files=files, data=data).json()
    assert again["data"][0]["b64_json"] == body["data"][0]["b64_json"]


def test_inpaint_json_data_url_with_resize(api_client, picture, local_pipeline):
    edit = box_mask((64, 64), (32, 16, 64, 48))
    body = {
        "prompt": PROMPT, "size": "128x64", "seed": 4, "num_inference_steps": 2, "response_format": "url",
        "image": "data:image/png;base64," + base64.b64encode(png(picture)).decode(),
        "mask": base64.b64encode(png(openai_mask(edit))).decode(),
    }
    r = api_client.post("/v1/images/edits", json=body)
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    out = Image.open(io.BytesIO(api_client.get(url.replace("http://testserver", "")).content))
    assert out.size == (128, 64)
    # The service's answer is the pipeline's edit of the same inputs (the ingress resizes as diffusers would).
    spec = ImageEditRequest(**{k: v for k, v in body.items() if k not in ("image", "mask")}).resolve(
        local_pipeline.preset, 0, picture.size, inpaint=True)
    assert spec.strength == 1.0
    expected = local_pipeline.edit(spec, picture, edit)[0]
    assert np.array_equal(pixels(out), pixels(expected))


def test_openai_client_edit_in_process(api_client, picture):
    """OpenAI's own client (multipart encoding, `image`/`mask` files, extra_body fields) against the in-process
    app: the wire format without a cluster."""
    from openai import OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=api_client, max_retries=0)
    edit = box_mask((64, 64), (32, 16, 64, 48))
    result = client.images.edit(
        image=("in.png", png(picture), "image/png"), mask=("mask.png", png(openai_mask(edit)), "image/png"),
        prompt=PROMPT, n=2, size="64x64", response_format="b64_json",
        extra_body={"seeds": [1, 2], "num_inference_steps": 2, "strength": 0.9},
    )
    assert [d.model_extra["seed"] for d in result.data] == [1, 2]
    assert Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size == (64, 64)
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        client.images.edit(image=("x.png", b"junk", "image/png"), prompt=PROMPT)
    assert e.value.param == "image"


def test_openai_client_edit_against_the_ray_service(service, picture):
    """The same through the deployed Ray graph (vae.encode → denoiser.denoise_image → vae.decode)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{service}/v1", api_key="x", max_retries=0, timeout=300)
    edit = box_mask((64, 64), (32, 16, 64, 48))
    inpainted = client.images.edit(
        image=("in.png", png(picture), "image/png"), mask=("mask.png", png(openai_mask(edit)), "image/png"),
        prompt=PROMPT, n=2, size="64x64", extra_body={"seeds": [1, 2]},
    )
    assert [d.model_extra["seed"] for d in inpainted.data] == [1, 2]
    # The graph's backend composes as the in-process one does: outside the overlay's soft edge, the input.
    outside = np.asarray(overlay_mask(edit, None)) == 0
    for d in inpainted.data:
        out = pixels(Image.open(io.BytesIO(base64.b64decode(d.b64_json))))
        assert np.array_equal(out[outside], pixels(picture)[outside])
    img2img = client.images.edit(image=("in.png", png(picture), "image/png"), prompt=PROMPT,
                                 extra_body={"seed": 1, "strength": 0.5})
    out = Image.open(io.BytesIO(base64.b64decode(img2img.data[0].b64_json)))
    assert out.size == picture.size
    again = client.images.edit(image=("in.png", png(picture), "image/png"), prompt=PROMPT,
                               extra_body={"seed": 1, "strength": 0.5})
    assert again.data[0].b64_json == img2img.data[0].b64_json


# ------------------------------------------------------------------------- behaviour of the trained model

def test_inpainting_keeps_the_outside_and_draws_the_prompt_inside(local_pipeline):
    lp = local_pipeline
    source = render(Scene("red", "circle", "left", "white"), 128)  # the default size
    edit = box_mask((128, 128), (0, 0, 64, 128))  # the left half, where the circle is
    outside = np.asarray(edit.filter(ImageFilter.MaxFilter(17))) == 0  # ≥ 8 px away from the edit area
    prompt = "a blue square on the left, white background"
    spec = ImageEditRequest(prompt=prompt, n=4, seed=0).resolve(lp.preset, 0, source.size, inpaint=True)
    results = lp.edit(spec, source, edit)
    # Outside the overlay's soft edge (2 px) the output is the input itself …
    kept = np.asarray(overlay_mask(edit, None)) == 0
    for out in results:
        assert np.array_equal(pixels(out)[kept], pixels(source)[kept])
    # … which is the overlay's doing: the model's own output there is the VAE's reconstruction of the input (the
    # pipeline blends the image latents back in after every step), PSNR ≥ 30 dB for every seed but not exact …
    raw = lp.edit(dataclasses.replace(spec, keep_unmasked=False), source, edit)
    for out in raw:
        assert 30 <= psnr(pixels(out)[outside], pixels(source)[outside]) < float("inf")
    # … and inside it draws the prompt for most seeds: the prompt's colour at the prompt's place. (Shape is the
    # embedded model's weak attribute, ~70 % in benchmarks/eval_model.py, so it is not required per image here.)
    drawn = [_colour_and_place(out, prompt) for out in results]
    assert sum(drawn) >= 3, drawn


def test_img2img_strength_moves_from_the_input_to_the_prompt(local_pipeline):
    lp = local_pipeline
    source = render(Scene("red", "circle", "left", "white"), 128)  # the default size
    prompt = "a blue square on the right, white background"
    seeds = [0, 1, 2, 3]

    def run(strength):
        spec = ImageEditRequest(prompt=prompt, seeds=seeds, n=len(seeds), strength=strength).resolve(
            lp.preset, 0, source.size)
        return lp.edit(spec, source)

    low, high = run(0.25), run(1.0)
    low_psnr = [psnr(pixels(o), pixels(source)) for o in low]
    high_psnr = [psnr(pixels(o), pixels(source)) for o in high]
    # A quarter of the 4-step schedule is one step from σ = 0.5 (signal-to-noise 1): every output is still closer
    # to the input than any full-strength output. This model, asked for a
    # different shape, colour and place, already redraws much of the picture there (a warm smear where the red
    # circle was); keeping the input whole is the lowest 8-step strength's job (the next test).
    assert min(low_psnr) > max(high_psnr) and statistics.mean(low_psnr) > statistics.mean(high_psnr) + 1.5, (
        low_psnr, high_psnr)
    kept = [score(o, parse_prompt("a red circle on the left, white background"))["background"] for o in low]
    assert all(kept), kept
    # The whole schedule: the prompt's place (the input has its shape on the other side) for every seed, and the
    # prompt's colour there too for most (measured at 128x128: 2 of 4; this model reads blue as green in the other
    # two, its weakest colour pair at this size).
    placed = [score(o, parse_prompt(prompt))["position"] for o in high]
    assert all(placed), placed
    followed = [_colour_and_place(o, prompt) for o in high]
    assert sum(followed) >= 2, followed


def _colour_and_place(image, prompt: str) -> bool:
    result = score(image, parse_prompt(prompt))
    return result["color"] and result["position"] and result["background"]


def test_img2img_lowest_strength_of_the_8_step_model_keeps_the_input(local_pipeline):
    """Strength is quantised to whole steps of a shift-3 schedule: on 4 steps the least is one step from σ = 0.5,
    on 8 steps one step from σ ≈ 0.3, where the input's layout survives a prompt that asks for another place and
    colour: its shape, place and background in every seed. Colour is what the model repaints from one step, and the
    8-step model's single step from the lower σ stays the closer to the input (measured at 128x128 on the model
    after its bilingual stage: 18.0 dB mean PSNR to the input against 16.3 for the 4-step model; its output is a
    circle patched with green and blue, the input's red kept in 1 of 4 seeds; see docs/image_inputs.md)."""
    lp = local_pipeline
    lightning = sorted((v for v in lp.preset.variants if v.lightning_lora), key=lambda v: v.num_inference_steps)
    source = render(SOURCE_SCENE, 128)  # the default size

    def lowest_strength(model):
        spec = ImageEditRequest(prompt="a blue circle on the right, white background", model=model, n=4, seed=0,
                                strength=0.1).resolve(lp.preset, 0, source.size)
        return lp.edit(spec, source)

    outs = lowest_strength(lightning[-1].id)
    layout = [score(o, SOURCE_SCENE) for o in outs]
    assert all(r["shape"] and r["position"] and r["background"] for r in layout), layout
    eight = statistics.mean(psnr(pixels(o), pixels(source)) for o in outs)
    four = statistics.mean(psnr(pixels(o), pixels(source)) for o in lowest_strength(lightning[0].id))
    assert eight > four + 1, (eight, four)


def test_full_strength_img2img_is_text_to_image(local_pipeline, picture):
    """Strength 1 noises the input to σ = 1, i.e. replaces it: with posterior-mean encoding (which draws nothing
    from the seeds' generators) the output is exactly the text-to-image output for the same seeds."""
    from lightray.schemas import ImageGenerationRequest

    lp = local_pipeline
    if lp.preset.image_encode_mode != "argmax":
        pytest.fail("this check is for the argmax encode mode")
    fields = dict(prompt=PROMPT, n=2, seed=21, num_inference_steps=2, size=f"{picture.width}x{picture.height}")
    edited = lp.edit(ImageEditRequest(**fields, strength=1.0).resolve(lp.preset, 0, picture.size), picture)
    generated = lp.generate(ImageGenerationRequest(**fields).resolve(lp.preset, 0))
    for a, b in zip(edited, generated):
        assert np.array_equal(pixels(a), pixels(b))


def test_crop_helpers_equal_diffusers():
    """lightray.edits' crop region and fill/crop resizes (written out so the ingress needs no diffusers) give
    exactly what diffusers' VaeImageProcessor gives, over random masks, pads, image and target sizes."""
    from diffusers.image_processor import VaeImageProcessor

    from lightray.edits import crop_region, resize_crop, resize_fill

    processor = VaeImageProcessor(vae_scale_factor=16)
    rng = np.random.default_rng(0)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(24, 200, size=2))
        tw, th = (int(v) for v in rng.choice([32, 48, 64, 96, 128], size=2))
        mask = np.zeros((h, w), dtype=np.uint8)
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        mask[y0:int(rng.integers(y0 + 1, h)), x0:int(rng.integers(x0 + 1, w))] = 255
        mask_image = Image.fromarray(mask, "L")
        pad = int(rng.choice([0, 4, 16, 64]))
        assert crop_region(mask_image, tw, th, pad) == processor.get_crop_region(mask_image, tw, th, pad=pad)
        picture = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
        for ours, mode in ((resize_fill, "fill"), (resize_crop, "crop")):
            for image in (picture, mask_image):
                assert np.array_equal(np.asarray(ours(image, tw, th)),
                                      np.asarray(processor.resize(image, th, tw, resize_mode=mode))), (mode, w, h, tw, th)


def test_a_16_bit_grey_png_keeps_its_greys():
    """PIL's own conversion of a 16-bit grey PNG to RGB clips every value above 255: the picture came out white."""
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")  # uint16 → mode "I;16"
    picture, _ = load_edit_inputs(buf.getvalue())
    got = np.asarray(picture, dtype=int)
    assert picture.mode == "RGB" and got.std() > 50  # not a white (or black) page
    expected = np.rint(ramp.astype(float) * 255 / 65535).astype(int)
    assert np.abs(got[..., 0] - expected).max() <= 1 and (got[..., 0] == got[..., 2]).all()


def test_a_deeply_nested_json_edit_is_a_400_not_a_500(api_client):
    r = api_client.post("/v1/images/edits", content="[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "request"

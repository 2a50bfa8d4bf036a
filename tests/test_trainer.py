"""LoRA trainer: tenant data sets, their validation, the adapter file format serving loads, the Ray job end to end
(`ray job submit` → Ray Train → registry → the denoising engine), and the KubeRay manifest."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lightray.fingerprint import fingerprint_model
from lightray.config import load_preset
from lightray.registry import AdapterRegistry
from lightray.training.config import TrainConfig, load_train_config
from lightray.training.data import DatasetError, DatasetLimits, fetch_dataset, load_imagefolder
from lightray.training.flow_matching import predict
from lightray.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_TARGETS
from lightray.training.trainer import LoraTrainer, run_training
from lightray.world.datasets import METADATA_FILENAME, make_dataset
from lightray.world.evaluator import parse_prompt, read_image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRIGGER = "lrzring"
PRESET_REF = os.environ.get("LIGHTRAY_TEST_PRESET", "lightray-shapes")


@pytest.fixture(scope="module")
def ring_dataset(tmp_path_factory) -> Path:
    return make_dataset("ring", tmp_path_factory.mktemp("data") / "ring", 16, TRIGGER, seed=3)


def _small_folder(tmp_path: Path, n: int = 3) -> Path:
    folder = make_dataset("ring", tmp_path / "ds", n, TRIGGER, seed=1)
    return folder


def _write_meta(folder: Path, lines: list) -> None:
    (folder / METADATA_FILENAME).write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n")


def _meta(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / METADATA_FILENAME).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ data set


def test_ring_dataset_is_imagefolder_with_parseable_bilingual_captions(ring_dataset):
    records = _meta(ring_dataset)
    assert len(records) == 16 and len(list(ring_dataset.glob("*.png"))) == 16
    languages = set()
    for r in records:
        assert set(r) == {"file_name", "text"}
        assert TRIGGER in r["text"]
        scene = parse_prompt(r["text"])  # the evaluator reads every attribute from the caption...
        assert scene.shape == "ring"
        image = Image.open(ring_dataset / r["file_name"])
        assert image.size == (128, 128) and image.mode == "RGB"  # the default size
        assert read_image(image).shape == "ring"  # ...and the shape from the pixels
        languages.add("zh" if "圆环" in r["text"] else "en")
    assert languages == {"en", "zh"}


def test_dataset_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "lightray.world.datasets", *a], cwd=REPO,
                                    capture_output=True, text=True, timeout=120)
    ok = run("ring", "--out", str(tmp_path / "ring"), "--count", "4", "--trigger", TRIGGER)
    assert ok.returncode == 0, ok.stderr
    assert len(_meta(tmp_path / "ring")) == 4
    again = run("ring", "--out", str(tmp_path / "ring"), "--count", "4")
    assert again.returncode == 1 and "not empty" in again.stderr
    bad = run("ring", "--out", str(tmp_path / "x"), "--count", "4", "--trigger", "ring")
    assert bad.returncode == 1 and "trigger word" in bad.stderr


def _missing_folder(f: Path) -> Path:
    return f / "nope"


def _empty_folder(f: Path) -> Path:
    (f / "empty").mkdir()
    return f / "empty"


def _no_metadata(f: Path) -> Path:
    (f / METADATA_FILENAME).unlink()
    return f


def _edit(fn):
    def apply(f: Path) -> Path:
        records = _meta(f)
        _write_meta(f, fn(records, f))
        return f
    return apply


BAD_DATASETS = {
    "missing folder": (_missing_folder, r"does not exist"),
    "empty folder": (_empty_folder, r"is empty"),
    "no metadata.jsonl": (_no_metadata, r"has no metadata\.jsonl"),
    "no records": (_edit(lambda r, f: ["", "  "]), r"has no records"),
    "not json": (_edit(lambda r, f: [r[0], "{oops"]), r"line 2: not valid JSON"),
    "not an object": (_edit(lambda r, f: [r[0], "[1, 2]"]), r"line 2: expected a JSON object"),
    "no file_name": (_edit(lambda r, f: [r[0], {"text": "a red ring"}]), r'line 2: missing "file_name"'),
    "no text": (_edit(lambda r, f: [r[0], {"file_name": r[1]["file_name"]}]), r'line 2: missing "text"'),
    "empty text": (_edit(lambda r, f: [r[0], {"file_name": r[1]["file_name"], "text": "  "}]),
                   r'line 2: "text" is empty'),
    "text not a string": (_edit(lambda r, f: [{"file_name": r[0]["file_name"], "text": 3}]),
                          r'line 1: "text" must be a string'),
    "file missing": (_edit(lambda r, f: [r[0], {"file_name": "ghost.png", "text": "x"}]),
                     r"line 2: file 'ghost.png' does not exist"),
    "escapes with ..": (_edit(lambda r, f: [r[0], {"file_name": "../outside.png", "text": "x"}]),
                        r"line 2: file_name '\.\./outside\.png' escapes the dataset folder"),
    "absolute path": (_edit(lambda r, f: [{"file_name": str((f / r[0]["file_name"]).resolve()), "text": "x"}]),
                      r"line 1: file_name .* escapes the dataset folder"),
}


@pytest.mark.parametrize("case", list(BAD_DATASETS))
def test_invalid_datasets_are_rejected_with_a_clear_error(tmp_path, case):
    folder = _small_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")  # exists, so only the escape check can refuse it
    breaker, pattern = BAD_DATASETS[case]
    with pytest.raises(DatasetError, match=pattern) as info:
        load_imagefolder(breaker(folder), 64)
    assert str(info.value).startswith("invalid dataset ")


def test_symlink_escaping_the_folder_is_rejected(tmp_path):
    folder = _small_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    _write_meta(folder, [{"file_name": "link.png", "text": "x"}])
    with pytest.raises(DatasetError, match="escapes the dataset folder"):
        load_imagefolder(folder, 64)


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_corrupt_images_are_rejected(tmp_path, content):
    folder = _small_folder(tmp_path)
    name = _meta(folder)[1]["file_name"]
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    with pytest.raises(DatasetError, match=rf"line 2: cannot read image '{name}'"):
        load_imagefolder(folder, 64)


def test_every_problem_is_listed_at_once(tmp_path):
    folder = _small_folder(tmp_path)
    r = _meta(folder)
    _write_meta(folder, [r[0], {"text": "a"}, {"file_name": "ghost.png", "text": "b"}, {"file_name": r[2]["file_name"]}])
    with pytest.raises(DatasetError) as info:
        load_imagefolder(folder, 64)
    # Three bad lines, and r[1]'s image, which no line captions any more.
    assert len(info.value.problems) == 4
    assert all(f"line {n}" in str(info.value) for n in (2, 3, 4))
    assert f"image {r[1]['file_name']!r} has no caption" in str(info.value)
    assert "1 of 4 records are usable; set skip_bad_images: true" in str(info.value)


def _sized_folder(tmp_path: Path, sizes: list[tuple[int, int]]) -> Path:
    folder = tmp_path / "sized"
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i % 255, 80, 160)).save(folder / f"{i}.png")
    _write_meta(folder, [{"file_name": f"{i}.png", "text": f"image {i}"} for i in range(len(sizes))])
    return folder


def test_images_go_to_the_bucket_of_their_aspect_ratio(preset, tmp_path):
    from lightray.training.buckets import resolve_buckets

    # The embedded preset serves exact sizes: within 192x128 pixels the buckets are the largest of each ratio.
    cfg = TrainConfig(tenant="demo", name="b", dataset=str(tmp_path), max_pixels=192 * 128)
    buckets = resolve_buckets(cfg, preset)
    assert sorted(buckets.sizes) == [(64, 128), (128, 64), (128, 128), (128, 192), (192, 128)]
    assert all(preset.size_refusal(w, h) is None for w, h in buckets.sizes)
    folder = _sized_folder(tmp_path, [(300, 290), (400, 210), (200, 310), (260, 170)])
    data = load_imagefolder(folder, buckets)
    assert [data.size(i) for i in range(len(data))] == [(128, 128), (128, 64), (128, 192), (192, 128)]
    assert data.bucket_counts() == {(128, 64): 1, (128, 128): 1, (128, 192): 1, (192, 128): 1}
    with pytest.raises(ValueError, match="bucket 100x100 is not a size preset lightray-shapes serves"):
        resolve_buckets(cfg.model_copy(update={"buckets": [(100, 100)]}), preset)
    # The real preset serves a continuum: one bucket per aspect ratio within the budget.
    real = load_preset("qwen-image-lightning")
    wide = resolve_buckets(cfg.model_copy(update={"max_pixels": 1024 * 1024}), real)
    assert (1024, 1024) in wide.sizes and len(wide.sizes) == 7
    assert all(w * h <= 1024 * 1024 and real.size_refusal(w, h) is None for w, h in wide.sizes)


def test_bad_images_are_refused_or_skipped_with_a_count(preset, tmp_path):
    from lightray.training.buckets import Buckets

    buckets = Buckets(((128, 128), (128, 64)), refuse_smaller=True)
    folder = _sized_folder(tmp_path, [(200, 200), (100, 100), (256, 128), (90, 40)])
    (folder / "1.png").write_bytes(b"not a png")
    Image.new("RGB", (200, 200)).save(folder / "stray.png")
    with pytest.raises(DatasetError) as info:
        load_imagefolder(folder, buckets)
    message = str(info.value)
    assert "line 2: cannot read image '1.png'" in message
    assert "line 4: image '3.png' is 90x40, smaller than the smallest bucket of its aspect ratio (128x64" in message
    assert "image 'stray.png' has no caption" in message
    assert "2 of 4 records are usable; set skip_bad_images: true" in message
    data = load_imagefolder(folder, buckets, skip_bad_images=True)
    assert data.files == ["0.png", "2.png"] and data.bucket_counts() == {(128, 64): 1, (128, 128): 1}
    assert any("skipped 2 of 4 records and 1 uncaptioned image(s)" in n for n in data.notes)
    # The square mode of the toy configs upscales instead of refusing.
    assert load_imagefolder(_sized_folder(tmp_path / "s", [(32, 32)]), 64).size(0) == (64, 64)


def test_modes_and_sizes_are_normalised(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    rgba = Image.new("RGBA", (100, 80), (0, 0, 0, 0))  # fully transparent: must become white, not black
    rgba.paste((220, 40, 40, 255), (40, 30, 60, 50))
    rgba.save(folder / "a.png")
    Image.new("L", (32, 32), 128).save(folder / "b.png")
    Image.new("RGB", (64, 64), (40, 80, 220)).convert("P").save(folder / "c.png")
    Image.new("CMYK", (70, 70)).save(folder / "d.jpg")
    _write_meta(folder, [{"file_name": n, "text": f"image {n}"} for n in ("a.png", "b.png", "c.png", "d.jpg")])
    data = load_imagefolder(folder, 64)
    images = np.stack([data.image(i) for i in range(len(data))])
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert tuple(images[0, 0, 0]) == (255, 255, 255)
    assert tuple(images[0, 32, 32]) == (220, 40, 40)  # the centre crop keeps the middle
    assert data.captions == ["image a.png", "image b.png", "image c.png", "image d.jpg"]
    assert any("converted to RGB" in n for n in data.notes) and any("resized" in n for n in data.notes)


def test_dataset_hash_covers_captions_and_pixels(tmp_path):
    folder = _small_folder(tmp_path)
    h = load_imagefolder(folder, 64).hash
    assert h.startswith("sha256:") and load_imagefolder(folder, 64).hash == h
    records = _meta(folder)
    records[0]["text"] += " again"
    _write_meta(folder, records)
    h2 = load_imagefolder(folder, 64).hash
    assert h2 != h
    img = Image.open(folder / records[1]["file_name"]).convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))
    img.save(folder / records[1]["file_name"])
    assert load_imagefolder(folder, 64).hash not in (h, h2)


def test_dataset_bounds_are_checked_before_reading_and_name_their_setting(tmp_path, monkeypatch):
    """Records, bytes per file and bytes in all are bounded (TrainConfig's max_dataset_records, max_file_bytes,
    max_dataset_bytes); a file past its cap is refused from a stat, never read whole."""
    folder = _small_folder(tmp_path, n=3)
    names = [r["file_name"] for r in _meta(folder)]
    sizes = [(folder / n).stat().st_size for n in names]
    with pytest.raises(DatasetError, match=r"3 records, more than max_dataset_records \(2\)"):
        load_imagefolder(folder, 64, limits=DatasetLimits(max_records=2))
    with pytest.raises(DatasetError, match=r"line 3: the files named up to .* take more than max_dataset_bytes"):
        load_imagefolder(folder, 64, limits=DatasetLimits(max_total_bytes=sizes[0] + sizes[1] + sizes[2] - 1))
    big = max(sizes)
    read = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real_read_bytes(self))
    with pytest.raises(DatasetError, match=rf"file '{names[sizes.index(big)]}' is larger than max_file_bytes") as info:
        load_imagefolder(folder, 64, limits=DatasetLimits(max_file_bytes=big - 1))
    assert "set skip_bad_images: true" in str(info.value) and not read
    skipped = load_imagefolder(folder, 64, skip_bad_images=True, limits=DatasetLimits(max_file_bytes=big - 1))
    assert len(skipped) == 2
    cfg = TrainConfig(tenant="demo", name="b", dataset=str(folder), max_dataset_records=5, max_file_bytes=2048,
                      max_dataset_bytes=4096)
    assert cfg.dataset_limits() == DatasetLimits(5, 2048, 4096)


@pytest.mark.parametrize("fmt,name", [("TIFF", "x.tif"), ("BMP", "x.bmp"), ("GIF", "x.gif"), ("EPS", "x.png")])
def test_only_png_jpeg_and_webp_are_decoded(tmp_path, fmt, name):
    """Image.open runs only the PNG, JPEG and WEBP decoders on a data set's files, whatever their name says (EPS
    would run Ghostscript; TIFF and PSD are large, old decoders)."""
    folder = _small_folder(tmp_path, n=2)
    records = _meta(folder)
    if fmt == "EPS":
        (folder / name).write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    else:
        Image.new("RGB", (64, 64), "red").save(folder / name, format=fmt)
    _write_meta(folder, records + [{"file_name": name, "text": "a red square"}])
    with pytest.raises(DatasetError) as info:
        load_imagefolder(folder, 64)
    assert f"line 3: image {name!r} is {fmt}; accepted formats are PNG, JPEG and WEBP" in str(info.value)


def test_the_driver_keeps_file_bytes_and_workers_decode_their_shard(tmp_path, monkeypatch):
    """No pixels are held in the loaded data set: each image's file bytes and bucket, decoded on use (a worker
    decodes its own shard in the caching pass), to the same pixels every time."""
    import lightray.training.data as data_module

    folder = _small_folder(tmp_path, n=4)
    data = load_imagefolder(folder, 64)
    assert not any(isinstance(v, np.ndarray) for v in vars(data).values())
    assert sum(len(b) for b in data.sources) == sum((folder / f).stat().st_size for f in data.files)
    decoded = []
    real = data_module._upright_rgb
    monkeypatch.setattr(data_module, "_upright_rgb", lambda im: decoded.append(1) or real(im))
    shard = data.shard(1, 2)
    assert not decoded and len(shard) == 2
    first = shard.image(0)
    assert len(decoded) == 1 and first.shape == (64, 64, 3) and np.array_equal(first, data.image(1))


def test_a_remote_dataset_is_bounded_before_download(s3_server, s3_prefix, tmp_path):
    import fsspec

    folder = _small_folder(tmp_path, n=3)
    fs, root = fsspec.core.url_to_fs(s3_prefix, **s3_server.storage_options)
    for p in folder.iterdir():
        fs.put_file(str(p), f"{root}/bounded/{p.name}")
    url = f"{s3_prefix}/bounded"
    with pytest.raises(DatasetError, match=r"more than max_dataset_records \(2\)"):
        fetch_dataset(url, s3_server.storage_options, tmp_path / "a", DatasetLimits(max_records=2))
    with pytest.raises(DatasetError, match="max_dataset_bytes"):
        fetch_dataset(url, s3_server.storage_options, tmp_path / "b", DatasetLimits(max_total_bytes=2048))
    sizes = {r["file_name"]: (folder / r["file_name"]).stat().st_size for r in _meta(folder)}
    name, big = max(sizes.items(), key=lambda kv: kv[1])
    limits = DatasetLimits(max_file_bytes=big - 1)
    local = fetch_dataset(url, s3_server.storage_options, tmp_path / "c", limits)
    with pytest.raises(DatasetError, match=rf"file '{name}' is larger than max_file_bytes"):
        load_imagefolder(local, 64, limits=limits)


# --------------------------------------------------------------------------------------------------- config


def test_train_config_file_and_docs():
    cfg = load_train_config(REPO / "configs/train/ring.yaml")
    assert (cfg.tenant, cfg.name, cfg.trigger_words) == ("demo", "ring", [TRIGGER])
    assert cfg.target_modules == LORA_TARGETS
    undocumented = [n for n, f in TrainConfig.model_fields.items() if not f.description]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    with pytest.raises(ValueError, match="extra"):
        load_train_config(REPO / "configs/train/ring.yaml", {"learning_rte": 1})
    with pytest.raises(ValueError, match="multiple of num_workers"):
        load_train_config(REPO / "configs/train/ring.yaml", {"batch_size": 5, "num_workers": 2})
    with pytest.raises(ValueError, match="invalid tenant"):
        load_train_config(REPO / "configs/train/ring.yaml", {"tenant": "../etc"})
    with pytest.raises(ValueError, match="num_workers x gradient_accumulation_steps = 4"):
        load_train_config(REPO / "configs/train/ring.yaml", {"batch_size": 6, "gradient_accumulation_steps": 2})
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="adamw_8bit needs bitsandbytes"):
            load_train_config(REPO / "configs/train/ring.yaml", {"optimizer": "adamw_8bit"})
    assert "registry_storage_options" not in cfg.recorded()
    frame = load_train_config(REPO / "configs/train/frame.yaml")  # the acceptance demo's config
    assert (frame.tenant, frame.name, frame.trigger_words) == ("demo", "frame", ["lrzframe"])
    assert frame.batch_size % frame.num_workers == 0
    # One recipe, tuned on both demo concepts (a style and a shape): the configs differ only in what they train on.
    data_keys = {"name", "dataset", "trigger_words"}
    differing = {k for k in TrainConfig.model_fields if k not in data_keys and getattr(cfg, k) != getattr(frame, k)}
    assert not differing, f"ring.yaml and frame.yaml differ in their recipe: {sorted(differing)}"


def test_fingerprint_model(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTRAY_HASH_CACHE", str(tmp_path / "hashes.json"))
    fp = fingerprint_model(preset)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp) and fingerprint_model(preset) == fp
    fake = tmp_path / "m"
    (fake / "transformer").mkdir(parents=True)
    (fake / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"one")
    other = preset.model_copy(update={"path": str(fake)})
    other.__dict__.pop("root", None)
    a = fingerprint_model(other)
    time.sleep(0.01)
    (fake / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"two")
    assert fingerprint_model(other) not in (a, fp)
    # Each file's digest is kept on disk under (path, size, mtime), for the next process on the node.
    cached = json.loads((tmp_path / "hashes.json").read_text())
    weights = str(fake / "transformer" / "diffusion_pytorch_model.safetensors")
    assert len([k for k in cached if k.startswith(weights + "|")]) == 2


# ------------------------------------------------------------------------------------- trainer, in process


def _config(dataset: Path, **kw) -> TrainConfig:
    base = dict(tenant="demo", name="ring", dataset=str(dataset), preset=PRESET_REF, trigger_words=[TRIGGER],
                rank=4, alpha=8, steps=4, batch_size=4, log_every=1, checkpoint_every=2, warmup_steps=1,
                learning_rate=1e-2, torch_threads=1, resolution=64)  # the test images' size (the preset's default is 128)
    return TrainConfig(**{**base, **kw})


def test_adapter_files_load_in_diffusers_exactly_as_trained(preset, ring_dataset, tmp_path):
    """The saved folder, read by `load_lora_weights` (what serving does), reproduces the trained model's output
    exactly, with alpha != rank (the scale travels in the safetensors metadata)."""
    from diffusers import QwenImagePipeline

    torch.set_num_threads(1)
    cfg = _config(ring_dataset)
    data = load_imagefolder(ring_dataset, 64)
    trainer = LoraTrainer(cfg, preset, data)
    reports = []
    metrics = run_training(trainer, lambda m, ckpt: reports.append((m["step"], ckpt is not None)))
    assert reports == [(1, False), (2, True), (3, False), (4, True)]
    assert metrics["step"] == 4 and math.isfinite(metrics["final_loss"])
    folder = trainer.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, preset.base_model_id)

    trainer.transformer.eval()
    (bucket,) = trainer.buckets
    grid = (bucket[1] // 16, bucket[0] // 16)
    x = torch.randn(2, trainer.inputs.latents[bucket].shape[1], 64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.9])
    embeds, mask = trainer.inputs.text.batch(trainer.inputs.captions[bucket][:2])
    with torch.no_grad():
        trained = predict(trainer.transformer, x, sigma, embeds, mask, grid)
        pipe = QwenImagePipeline.from_pretrained(preset.root, text_encoder=None, tokenizer=None, vae=None)
        base = predict(pipe.transformer, x, sigma, embeds, mask, grid)
        pipe.load_lora_weights(str(folder), adapter_name="t")
        loaded = predict(pipe.transformer, x, sigma, embeds, mask, grid)
    assert (trained - base).abs().max() > 1e-3  # training changed the model...
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)  # ...and the files carry exactly that


def _lora_tensors_without_gradient(transformer, latents, embeds, mask, grid) -> set[str]:
    """The LoRA tensors one real forward and backward leaves without a gradient: how the trainer found the
    frozen set before it derived it from the structure."""
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    trainable = {n: p.requires_grad for n, p in lora.items()}
    for p in lora.values():
        p.requires_grad_(True)
    predict(transformer, latents, torch.tensor([0.5]), embeds, mask, grid).float().pow(2).mean().backward()
    unused = {n for n, p in lora.items() if p.grad is None}
    for n, p in lora.items():
        p.grad = None
        p.requires_grad_(trainable[n])
    return unused


def test_frozen_lora_tensors_are_the_ones_without_gradient(preset, ring_dataset):
    """`unread_lora_parameters` (structure only) is exactly the set a forward/backward leaves without gradient."""
    from lightray.training.lora import unread_lora_parameters

    torch.set_num_threads(1)
    trainer = LoraTrainer(_config(ring_dataset, steps=1), preset, load_imagefolder(ring_dataset, 64))
    (bucket,) = trainer.buckets
    embeds, mask = trainer.inputs.text.batch(trainer.inputs.captions[bucket][:1])
    latents = trainer.inputs.latents[bucket][:1]
    measured = _lora_tensors_without_gradient(trainer.transformer, latents, embeds, mask, (4, 4))
    structural = set(unread_lora_parameters(trainer.transformer))
    assert structural == measured and len(structural) == 6  # lora_A/B of to_add_out and the two text MLP linears
    trainable = {n for n, p in trainer.transformer.named_parameters() if p.requires_grad}
    assert not trainable & structural and all(p.dtype == torch.float32 for p in trainer.params)


def test_the_caching_pass_encodes_like_serving_and_is_reused_on_restart(preset, ring_dataset, tmp_path,
                                                                        monkeypatch):
    from lightray.stages.text_encoder import TextEncodeStage
    from lightray.stages.vae import VaeStage
    from lightray.training.cache import cached_inputs

    torch.set_num_threads(1)
    cfg = _config(ring_dataset, input_cache=str(tmp_path / "cache"))
    data = load_imagefolder(ring_dataset, 64)
    logs: list[str] = []
    first = cached_inputs(cfg, preset, data, 1, 2, torch.device("cpu"), log=logs.append)
    assert [p.name for p in (tmp_path / "cache").rglob("*.pt")] == ["rank-1-of-2.pt"]
    assert len(first) == 8 and list(first.latents) == [(64, 64)]
    # What serving computes for the same prompt (the preset's max_sequence_length and template prefix).
    caption = first.captions[(64, 64)][0]
    served = TextEncodeStage(preset).encode([caption])[0]
    np.testing.assert_array_equal(first.text.embeds[first.text.index[caption]].numpy(), served)

    def no_encoder(*args, **kwargs):
        raise AssertionError("a restarted run must not load an encoder")

    monkeypatch.setattr(TextEncodeStage, "__init__", no_encoder)
    monkeypatch.setattr(VaeStage, "__init__", no_encoder)
    again = cached_inputs(cfg, preset, data, 1, 2, torch.device("cpu"), log=logs.append)
    assert "reused 8 encoded images" in logs[-1]
    assert torch.equal(again.latents[(64, 64)], first.latents[(64, 64)])
    assert again.captions == first.captions and again.text.index == first.text.index


def test_checkpoint_resume_continues_the_same_run(preset, ring_dataset, tmp_path):
    torch.set_num_threads(1)
    data = load_imagefolder(ring_dataset, 64)
    straight = LoraTrainer(_config(ring_dataset), preset, data)
    run_training(straight)

    saved = []
    first = LoraTrainer(_config(ring_dataset, fail_at_step=2), preset, data)

    def keep(metrics, ckpt):
        if ckpt is not None:
            saved.append(first.save_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(RuntimeError, match="fail_at_step=2"):
        run_training(first, keep)
    resumed = LoraTrainer(_config(ring_dataset, fail_at_step=2), preset, data)
    resumed.load_checkpoint(saved[-1])
    assert resumed.resumed_from == 2
    metrics = run_training(resumed)  # fail_at_step only fires in a run that did not resume
    assert metrics["resumed_from_step"] == 2
    a, b = straight.lora_state_dict(), resumed.lora_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_dataset_from_s3_matches_the_local_one(s3_server, s3_prefix, tmp_path):
    import fsspec

    folder = _small_folder(tmp_path, n=4)
    fs, root = fsspec.core.url_to_fs(s3_prefix, **s3_server.storage_options)
    for p in folder.iterdir():
        fs.put_file(str(p), f"{root}/ring/{p.name}")
    local = fetch_dataset(f"{s3_prefix}/ring", s3_server.storage_options, tmp_path / "dl")
    assert load_imagefolder(local, 64).hash == load_imagefolder(folder, 64).hash
    # A file_name that escapes the prefix is neither downloaded nor accepted.
    records = _meta(folder) + [{"file_name": "../secret.png", "text": "x"}]
    fs.pipe_file(f"{root}/ring/{METADATA_FILENAME}", "\n".join(json.dumps(r) for r in records).encode())
    fs.put_file(str(folder / records[0]["file_name"]), f"{root}/secret.png")
    local = fetch_dataset(f"{s3_prefix}/ring", s3_server.storage_options, tmp_path / "dl2")
    assert not (tmp_path / "secret.png").exists()
    with pytest.raises(DatasetError, match="line 5: file_name '../secret.png' escapes"):
        load_imagefolder(local, 64)
    with pytest.raises(DatasetError, match="does not exist"):
        fetch_dataset(f"{s3_prefix}/nothing-here", s3_server.storage_options, tmp_path / "dl3")


def test_relative_paths_are_refused_inside_an_uploaded_working_dir(monkeypatch, tmp_path):
    from jobs.train_lora import UsageError, check_paths

    cfg = _config(Path("data/not-here-ring"), registry="./registry")
    check_paths(cfg)  # outside a job: relative paths mean the current directory
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    with pytest.raises(UsageError, match=r'--dataset "\$PWD/data/not-here-ring"'):
        check_paths(cfg)
    with pytest.raises(UsageError, match=r'--registry "\$PWD/registry"'):
        check_paths(_config(tmp_path, registry="./registry"))
    check_paths(_config(tmp_path, registry="s3://bucket/registry"))


# -------------------------------------------------------------------------------------- entrypoint, no Ray


def test_entrypoint_rejects_a_bad_dataset_before_training(tmp_path):
    folder = _small_folder(tmp_path)
    (folder / _meta(folder)[0]["file_name"]).write_bytes(b"garbage")
    registry = tmp_path / "registry"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(_config(folder, registry=str(registry)).model_dump(mode="json")))
    out = subprocess.run([sys.executable, "-m", "jobs.train_lora", "--config", str(cfg)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "invalid dataset" in out.stderr and "cannot read image" in out.stderr
    assert not registry.exists() or not AdapterRegistry(str(registry)).manifests()
    bad = subprocess.run([sys.executable, "-m", "jobs.train_lora", "--config", str(cfg), "--set", "rank=0"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "rank" in bad.stderr


def test_the_driver_publishes_without_reading_the_model(preset, ring_dataset, tmp_path, monkeypatch):
    """The driver's part of a run (validation, publishing) with the training replaced by a finished in-process run:
    the manifest's fingerprint is the worker's, and the driver never touches the model folder (a RayJob's head
    has no model volume). Serving then accepts the published adapter (its own fingerprint of the same files)."""
    import contextlib

    import jobs.train_lora as job
    from lightray.adapters import fetch_for_preset
    from lightray.config import ModelPreset

    torch.set_num_threads(1)
    registry = tmp_path / "registry"
    cfg = _config(ring_dataset, registry=str(registry), steps=2)
    trainer = LoraTrainer(cfg, preset, load_imagefolder(ring_dataset, 64))
    metrics = run_training(trainer)
    checkpoint = trainer.save_checkpoint(tmp_path / "final", metrics)

    class Finished:  # what TorchTrainer.fit() returns, as far as the driver reads it
        path = str(tmp_path / "ray_results")

        def __init__(self):
            self.metrics, self.checkpoint = metrics, self

        @contextlib.contextmanager
        def as_directory(self):
            yield str(checkpoint)

    def no_model(self):
        raise AssertionError("the driver read the model folder")

    monkeypatch.setattr(job, "fit", lambda config, data: Finished())
    monkeypatch.setattr(ModelPreset, "root", property(no_model))
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True))
    assert job.main(["--config", str(config_file)]) == 0
    monkeypatch.undo()
    manifest = AdapterRegistry(str(registry)).resolve("demo/ring")
    assert manifest.base_fingerprint == trainer.base_fingerprint == fingerprint_model(preset)
    assert manifest.base_family == preset.family == "qwen-image"
    fetched, folder = fetch_for_preset(AdapterRegistry(str(registry), cache_dir=tmp_path / "cache"), "demo/ring",
                                       preset)
    assert fetched.version == 1 and (Path(folder) / ADAPTER_WEIGHTS).is_file()


# ------------------------------------------------------------------------------------------ Ray job, e2e


def _submit(cluster, config: Path) -> str:
    job_id = f"lora-test-{uuid.uuid4().hex[:8]}"
    deadline = time.time() + 300  # a loaded 2-core machine can take minutes
    while True:
        out = cluster.run(str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--submission-id",
                          job_id, "--working-dir", ".", "--no-wait", "--",
                          sys.executable, "-m", "jobs.train_lora", "--config", str(config), timeout=300, check=False)
        # Right after `ray start` the dashboard may not have its job agent yet: it says so, and to try again.
        if out.returncode == 0 or "try again later" not in out.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, f"ray job submit failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return job_id


def _wait(cluster, job_id: str, timeout: float = 900) -> tuple[str, str]:
    """Poll `ray job status` until the job ends; return its status and `ray job logs`."""
    deadline, status, failures, out = time.time() + timeout, "?", 0, None
    while time.time() < deadline:
        out = cluster.run(str(BIN / "ray"), "job", "status", "--address", cluster.dashboard_url, job_id,
                          check=False, timeout=60)
        text = out.stdout + out.stderr
        # The CLI prints "Status for job 'x': RUNNING" while it runs, "Job 'x' succeeded|failed|was stopped" after.
        m = re.search(r"Status for job '[^']+': (\w+)|Job '[^']+' (succeeded|failed|was stopped)", text)
        failures = 0 if m else failures + 1
        assert failures < 10, f"the cluster stopped answering:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        if m:
            status = m.group(1) or {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(2)]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = cluster.run(str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard_url, job_id,
                       check=False, timeout=60).stdout
    return status, logs


def _job_config(tmp_path: Path, dataset: Path, **kw) -> tuple[Path, Path, Path]:
    registry, storage = tmp_path / "registry", tmp_path / "ray_results"
    cfg = _config(dataset, registry=str(registry), storage_path=str(storage), steps=20, batch_size=4,
                  log_every=5, checkpoint_every=8, num_workers=2, cpus_per_worker=0.1, learning_rate=1e-3,
                  warmup_steps=2, **kw)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True))
    return path, registry, storage


def _checkpoints(storage: Path) -> list[Path]:
    return sorted(p.parent for p in storage.rglob(ADAPTER_WEIGHTS))


@pytest.mark.slow
def test_ray_job_trains_survives_a_crash_and_publishes(ray_cluster, preset, ring_dataset, tmp_path):
    """`ray job submit` → 2 data-parallel workers → a worker crash at step 12 → Ray Train restarts the group
    from the step-8 checkpoint → finishes → the driver publishes; the adapter then loads in the denoiser."""
    from lightray.contracts import AdapterUse
    from lightray.pipeline import LocalPipeline
    from lightray.schemas import ImageGenerationRequest

    config, registry_dir, storage = _job_config(tmp_path, ring_dataset, fail_at_step=12, max_failures=1)
    status, logs = _wait(ray_cluster, _submit(ray_cluster, config))
    assert status == "SUCCEEDED", logs[-6000:]
    assert "step 20/20" in logs and "resumed from the checkpoint at step 8" in logs
    # The restarted workers loaded their encoded inputs from the run's storage instead of encoding again.
    assert "caching pass: wrote" in logs and "caching pass: reused" in logs
    assert "LIGHTRAY_PUBLISHED" in logs

    registry = AdapterRegistry(str(registry_dir), cache_dir=tmp_path / "cache")
    m = registry.resolve("demo/ring")
    assert m.version == 1 and set(m.files) == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    assert m.base_model_id == preset.base_model_id
    assert m.base_fingerprint == fingerprint_model(preset)
    assert (m.rank, m.alpha) == (4, 8.0)
    assert m.target_modules == sorted(LORA_TARGETS)
    assert m.trigger_words == [TRIGGER]
    assert m.dataset_hash == load_imagefolder(ring_dataset, 64).hash
    assert m.training_config["steps"] == 20 and m.training_config["num_workers"] == 2
    assert "registry_storage_options" not in m.training_config
    assert m.metrics["steps"] == 20 and m.metrics["num_workers"] == 2 and m.metrics["num_examples"] == 16
    assert m.metrics["resumed_from_step"] == 8 and math.isfinite(m.metrics["final_loss"])
    assert _checkpoints(storage), "checkpoints were reported to the Ray Train storage path"

    _, adapter_dir = registry.fetch("demo/ring", base_model_id=preset.base_model_id,
                                    base_fingerprint=fingerprint_model(preset))
    pipeline = LocalPipeline(preset)
    spec = ImageGenerationRequest(prompt=f"a red {TRIGGER} ring on the left, white background", seed=5).resolve(
        preset, 0)
    text = pipeline.encode(spec)
    before = pipeline.denoiser.denoise(spec.denoise_params(), text)
    pipeline.denoiser.load_adapter("demo/ring", str(adapter_dir))
    ringed = dataclasses.replace(spec, adapters=(AdapterUse("demo/ring"),))
    after = pipeline.denoiser.denoise(ringed.denoise_params(), text)
    plain = pipeline.denoiser.denoise(spec.denoise_params(), text)
    assert np.abs(after - before).max() > 1e-3, "the adapter changes the denoiser's output"
    np.testing.assert_allclose(plain, before, atol=1e-5)  # and only for requests that name it


@pytest.mark.slow
def test_crashing_ray_job_publishes_nothing(ray_cluster, ring_dataset, tmp_path):
    config, registry_dir, storage = _job_config(tmp_path, ring_dataset, fail_at_step=12)
    status, logs = _wait(ray_cluster, _submit(ray_cluster, config))
    assert status == "FAILED", logs[-6000:]
    assert "fail_at_step=12" in logs and "nothing published" in logs
    assert "LIGHTRAY_PUBLISHED" not in logs
    assert not registry_dir.exists() or not any(registry_dir.rglob("*")), "nothing written to the registry"
    assert _checkpoints(storage), "the crash came after a checkpoint (which stays in storage, unpublished)"


# ----------------------------------------------------------------------------------------------- KubeRay


def _rayjob() -> dict:
    return yaml.safe_load((REPO / "k8s/rayjob-train-lora.yaml").read_text())


def test_rayjob_manifest_runs_the_same_entrypoint():
    from jobs.train_lora import _parse_overrides, build_parser

    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"])
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train_lora"]
    args = build_parser().parse_args(argv[3:])
    config_path = REPO / Path(args.config).relative_to("/app")  # the image holds the repository at /app
    cfg = load_train_config(config_path, _parse_overrides(args))
    assert cfg.registry.startswith("s3://") and cfg.dataset.startswith("s3://")
    assert cfg.storage_path and cfg.storage_path.startswith("s3://")  # checkpoints reachable from every node
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["PYTHONPATH"] == "/app"

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]
    assert head["template"]["spec"]["containers"][0]["image"] and groups
    capacity = 0.0
    for group in groups:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        cpus = float(group["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
        capacity += group["replicas"] * (cpus // cfg.cpus_per_worker)
    assert capacity >= cfg.num_workers, "the worker groups can place every training worker"
    for pod in [head, *groups]:
        container = pod["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": "lightray-registry-s3"}} in container["envFrom"]
    text = (REPO / "k8s/rayjob-train-lora.yaml").read_text()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*:", text), "credentials come from the Secret only"


def test_rayjob_pod_templates_are_valid_kubernetes():
    kv = pytest.importorskip("kubernetes_validate")
    spec = _rayjob()["spec"]["rayClusterSpec"]
    for i, group in enumerate([spec["headGroupSpec"], *spec["workerGroupSpecs"]]):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}"}, "spec": group["template"]["spec"]}
        kv.validate(pod, "1.30.0", strict=True)

"""The caching pass: every training image through the VAE and every caption through the text encoder, once, on the
training device, before the transformer is loaded.

It runs serving's own stages (`TextEncodeStage`, `VaeStage`) on the worker's device in the preset's dtype, so the
embeddings are what a request's prompt gets (the preset's `max_sequence_length` and template prefix) and the
latents are normalised and packed as the denoiser's. Captions of one token length share a forward (no padding),
`cache_text_batch_size` at most, and images go through the VAE `cache_vae_batch_size` at a time, one bucket per
call; the memory plan (`lightray train estimate`) checks both batch sizes fit. The encoders are freed before the
transformer loads, so a GPU holds one model at a time.

The result is written to the run's storage (`TrainConfig.input_cache`, a folder or an fsspec URL such as s3://),
one file per rank, under a key of everything it depends on; a restarted run (Ray Train's `max_failures`, or a
resubmission of the same data and config) loads it instead of encoding again, without loading either encoder.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import tempfile
import time
from collections.abc import Callable

import torch

from lightray.config import ModelPreset, parse_width_height
from lightray.training.buckets import Size
from lightray.training.config import TrainConfig
from lightray.training.data import ImageCaptionDataset
from lightray.training.flow_matching import images_to_tensor

CACHE_FORMAT = 1
"""Bumped when what the file holds changes, so an old cache is not read as a new one."""
EMPTY_CAPTIONS = ("", " ")
"""What caption dropout trains with: the empty prompt and the pipeline's default negative prompt."""


@dataclasses.dataclass
class TextEmbeddings:
    """Caption → embeddings [tokens, hidden] (unpadded, in the model's dtype), batched with a mask."""

    index: dict[str, int]
    embeds: list[torch.Tensor]

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, longest, hidden] zero-padded embeddings and their [B, longest] mask (1 = a real token)."""
        rows = [self.embeds[self.index[c]] for c in captions]
        length = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            embeds[i, : r.shape[0]] = r
            mask[i, : r.shape[0]] = 1
        return embeds, mask


@dataclasses.dataclass
class CachedInputs:
    """One rank's encoded shard: per bucket, its examples' packed latents and captions."""

    latents: dict[Size, torch.Tensor]
    """(width, height) → [n, tokens, channels] packed, normalised latents in the model's dtype."""
    captions: dict[Size, list[str]]
    """The captions of those examples, in the same order."""
    text: TextEmbeddings
    """Every caption of the shard and the dropout captions."""

    def __len__(self) -> int:
        return sum(len(c) for c in self.captions.values())

    def to_file(self) -> dict:
        return {"format": CACHE_FORMAT, "latents": {f"{w}x{h}": t for (w, h), t in self.latents.items()},
                "captions": {f"{w}x{h}": c for (w, h), c in self.captions.items()},
                "text_index": self.text.index, "text_embeds": self.text.embeds}

    @classmethod
    def from_file(cls, state: dict) -> "CachedInputs":
        return cls({parse_width_height(k): v for k, v in state["latents"].items()},
                   {parse_width_height(k): v for k, v in state["captions"].items()},
                   TextEmbeddings(state["text_index"], state["text_embeds"]))


def cache_key(config: TrainConfig, preset: ModelPreset, data: ImageCaptionDataset, rank: int, world_size: int) -> str:
    """Everything the cached tensors depend on: the data set (its hash), the shard, the model and how it encodes
    (folder, dtype, sequence length, template prefix), the buckets the images were brought to."""
    parts = {
        "format": CACHE_FORMAT, "dataset": data.hash, "rank": rank, "world_size": world_size,
        "model": str(preset.path), "base_model_id": preset.base_model_id, "dtype": preset.dtype,
        "max_sequence_length": preset.max_sequence_length,
        "prompt_template_encode_start_idx": preset.prompt_template_encode_start_idx,
        "sizes": sorted({f"{w}x{h}" for w, h in (data.size(i) for i in range(len(data)))}),
        "skip_bad_images": config.skip_bad_images,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_url(config: TrainConfig) -> str | None:
    """The folder/URL the caching pass writes under, or None (nothing kept)."""
    if config.input_cache is not None:
        return config.input_cache.rstrip("/")
    if config.storage_path is not None:
        return config.storage_path.rstrip("/") + "/input-cache"
    return None


def encode_inputs(config: TrainConfig, preset: ModelPreset, shard: ImageCaptionDataset, device: torch.device,
                  log: Callable[[str], None] = print) -> CachedInputs:
    """Encode `shard` on `device` with serving's stages (see the module docstring), freeing each encoder after."""
    from lightray.stages.text_encoder import TextEncodeStage
    from lightray.stages.vae import VaeStage

    on_device = preset.model_copy(update={"device": str(device)})
    t0 = time.time()
    prompts = sorted(set(shard.captions) | set(EMPTY_CAPTIONS))
    dtype = getattr(torch, preset.dtype)
    text_stage = TextEncodeStage(on_device)
    embeds: dict[str, torch.Tensor] = {}
    for group in text_stage.batch_plan(prompts):
        for i in range(0, len(group), config.cache_text_batch_size):
            chunk = group[i : i + config.cache_text_batch_size]
            embeds.update(zip(chunk, (torch.from_numpy(e).to(dtype) for e in text_stage.encode_group(chunk))))
    del text_stage
    _free(device)
    text = TextEmbeddings({p: i for i, p in enumerate(prompts)}, [embeds[p] for p in prompts])
    t1 = time.time()

    vae_stage = VaeStage(on_device)
    by_bucket: dict[Size, list[int]] = {}
    for i in range(len(shard)):
        by_bucket.setdefault(shard.size(i), []).append(i)
    latents, captions = {}, {}
    for size, idx in sorted(by_bucket.items()):
        chunks = []
        for i in range(0, len(idx), config.cache_vae_batch_size):
            pixels = images_to_tensor(shard.image(j) for j in idx[i : i + config.cache_vae_batch_size])
            chunks.append(torch.from_numpy(vae_stage.encode_pixels(pixels)).to(dtype))
        latents[size] = torch.cat(chunks)
        captions[size] = [shard.captions[j] for j in idx]
    del vae_stage
    _free(device)
    log(f"caching pass on {device}: {len(prompts)} captions in {t1 - t0:.1f}s, {len(shard)} images in "
        f"{len(latents)} bucket(s) ({', '.join(f'{w}x{h}: {len(c)}' for (w, h), c in captions.items())}) in "
        f"{time.time() - t1:.1f}s")
    return CachedInputs(latents, captions, text)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cached_inputs(config: TrainConfig, preset: ModelPreset, data: ImageCaptionDataset, rank: int, world_size: int,
                  device: torch.device, log: Callable[[str], None] = print) -> CachedInputs:
    """This rank's encoded shard of `data`: loaded from the run's cache when an earlier start wrote it, else
    encoded (`encode_inputs`) and written there."""
    import fsspec

    shard = data.shard(rank, world_size)
    root = cache_url(config)
    if root is None:
        return encode_inputs(config, preset, shard, device, log)
    url = f"{root}/{cache_key(config, preset, data, rank, world_size)}/rank-{rank}-of-{world_size}.pt"
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        with tempfile.TemporaryDirectory(prefix="lora-inputs-") as tmp:
            fs.get_file(path, f"{tmp}/inputs.pt")
            inputs = CachedInputs.from_file(torch.load(f"{tmp}/inputs.pt", weights_only=True))
        log(f"caching pass: reused {len(inputs)} encoded images from {url}")
        return inputs
    inputs = encode_inputs(config, preset, shard, device, log)
    with tempfile.TemporaryDirectory(prefix="lora-inputs-") as tmp:
        torch.save(inputs.to_file(), f"{tmp}/inputs.pt")
        # Written under a temporary name and moved: a crash mid-upload never leaves a truncated cache behind.
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(f"{tmp}/inputs.pt", path + ".partial")
        fs.mv(path + ".partial", path)
    log(f"caching pass: wrote {url}")
    return inputs

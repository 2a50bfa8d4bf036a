"""Tenant data sets: imagefolder validation (every problem listed at once), fetching from fsspec URLs, and the
data-set hash recorded in the manifest.

A data set is untrusted input. Its size is bounded before anything is read (`DatasetLimits`: records, bytes per
file from a stat and a capped read, bytes in all), images are read only as PNG, JPEG or WEBP (`Image.open`'s
`formats`, so no EPS, TIFF or PSD decoder runs), and no decoded pixels are kept in the driver: it decodes one image
at a time to validate it and pick its bucket, and keeps the files' bytes (at most `max_dataset_bytes`), which each
worker decodes for its own shard (`ImageCaptionDataset.image`)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lightray.images import ACCEPTED_FORMATS, sniff_format, to_rgb
from lightray.training.buckets import Buckets, Size
from lightray.training.config import DatasetLimits

METADATA_FILENAME = "metadata.jsonl"
IMAGE_SIZE_LIMIT = 4096  # longest side accepted in a data set (decompression bombs are refused by PIL anyway)
_MAX_REPORTED_PROBLEMS = 20
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
"""Files in a data-set folder taken for images (each must be captioned by a metadata.jsonl line)."""


class DatasetError(ValueError):
    """The data set cannot be trained on; `problems` lists every reason found (one line each)."""

    def __init__(self, folder: str | Path, problems: Sequence[str], hint: str | None = None):
        self.folder = str(folder)
        self.problems = list(problems)
        shown = self.problems[:_MAX_REPORTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        lines = "\n".join(f"  - {p}" for p in shown) + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(f"invalid dataset {self.folder}:\n{lines}" + (f"\n{hint}" if hint else ""))


@dataclasses.dataclass
class ImageCaptionDataset:
    """A validated data set, ready to train on: each image's file bytes and its bucket's size. The pixels are
    decoded where they are used (`image`, in each worker for its shard), not held by the driver."""

    sources: list[bytes]
    """Each image's file, as read (PNG, JPEG or WEBP, validated)."""
    sizes: list[Size]
    """(width, height) of each image's bucket: `image(i)` is brought to it."""
    captions: list[str]
    files: list[str]
    hash: str
    """`dataset_hash` of the source folder (metadata.jsonl and the files trained on)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """What was normalised or skipped on load (mode conversions, resizes, skipped records), for the log."""

    def __len__(self) -> int:
        return len(self.captions)

    def size(self, i: int) -> Size:
        """(width, height) of example `i`."""
        return self.sizes[i]

    def image(self, i: int) -> np.ndarray:
        """Example `i`'s pixels: uint8 [height, width, 3], RGB, at its bucket's size."""
        with Image.open(io.BytesIO(self.sources[i]), formats=ACCEPTED_FORMATS) as im:
            return np.asarray(_fit(_upright_rgb(im), self.sizes[i]), dtype=np.uint8)

    def bucket_counts(self) -> dict[Size, int]:
        counts: dict[Size, int] = {}
        for i in range(len(self)):
            counts[self.size(i)] = counts.get(self.size(i), 0) + 1
        return dict(sorted(counts.items()))

    def shard(self, rank: int, world_size: int) -> "ImageCaptionDataset":
        """Every `world_size`-th example starting at `rank` (disjoint shards covering the data set)."""
        idx = list(range(rank, len(self), world_size))
        return dataclasses.replace(
            self, sources=[self.sources[i] for i in idx], sizes=[self.sizes[i] for i in idx],
            captions=[self.captions[i] for i in idx], files=[self.files[i] for i in idx],
        )


def _upright_rgb(image: Image.Image) -> Image.Image:
    """RGB, honouring EXIF orientation, as the service reads an upload (`lightray.images.to_rgb`: transparency
    composited over white, not dropped to black; 16-bit grey scaled to 8 bits)."""
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def _fit(image: Image.Image, size: Size) -> Image.Image:
    """Scale to cover `size` (width, height) and centre-crop to it (no-op for an image that already is)."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS)


def read_capped(path: Path, cap: int) -> bytes | None:
    """`path`'s bytes, or None when it is larger than `cap`: checked by a stat before reading, and the read stops
    one byte past the cap (a file that grows meanwhile is not read whole)."""
    if path.stat().st_size > cap:
        return None
    with path.open("rb") as f:
        data = f.read(cap + 1)
    return None if len(data) > cap else data


def dataset_hash(metadata: bytes, files: Sequence[tuple[str, bytes]]) -> str:
    """"sha256:<hex>" over metadata.jsonl's bytes, then each referenced file's name and bytes in metadata order:
    the same folder always hashes the same, and any change to a caption or a pixel changes it."""
    h = hashlib.sha256()
    h.update(b"metadata.jsonl\0")
    h.update(hashlib.sha256(metadata).digest())
    for name, data in files:
        h.update(name.encode("utf-8") + b"\0")
        h.update(hashlib.sha256(data).digest())
    return "sha256:" + h.hexdigest()


def load_imagefolder(folder: str | Path, buckets: Buckets | int, *, skip_bad_images: bool = False,
                     limits: DatasetLimits = DatasetLimits()) -> ImageCaptionDataset:
    """Validate and load an imagefolder data set (images + `metadata.jsonl`), each image at its bucket
    (`Buckets.pick`; an int is the square mode at that side).

    Raises `DatasetError` listing every problem: missing or empty folder, missing metadata.jsonl, lines that are
    not JSON objects, lines without `file_name` or with an empty `text`, files that do not exist or lie outside
    the folder, files past `limits.max_file_bytes`, images that are not PNG, JPEG or WEBP or cannot be decoded,
    images smaller than every bucket of their aspect ratio, image files in the folder that no line captions. More
    records than `limits.max_records`, or files past `limits.max_total_bytes` in all, refuse the data set at once,
    before the rest is read. With `skip_bad_images` the record-level problems skip their record instead
    (the notes say how many and why), and only a data set with nothing left is refused. Images of any mode are
    converted to RGB (alpha over white).
    """
    if isinstance(buckets, int):
        buckets = Buckets.square(buckets)
    root = Path(folder)
    if not root.exists():
        raise DatasetError(root, [f"dataset folder {root} does not exist"])
    if not root.is_dir():
        raise DatasetError(root, [f"{root} is not a folder"])
    if not any(root.iterdir()):
        raise DatasetError(root, [f"dataset folder {root} is empty"])
    meta_path = root / METADATA_FILENAME
    if not meta_path.is_file():
        raise DatasetError(root, [
            f"{root} has no {METADATA_FILENAME} (the imagefolder layout: images plus one JSON line "
            '{"file_name": ..., "text": ...} per image)'
        ])
    raw = read_capped(meta_path, limits.max_file_bytes)
    if raw is None:
        raise DatasetError(root, [f"{METADATA_FILENAME} is larger than max_file_bytes ({limits.max_file_bytes} "
                                  "bytes)"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(root, [f"{METADATA_FILENAME} is not UTF-8 ({err})"]) from None

    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) > limits.max_records:
        raise DatasetError(root, [f"{METADATA_FILENAME} has {len(lines)} records, more than max_dataset_records "
                                  f"({limits.max_records})"])
    real_root = root.resolve()
    problems: list[str] = []
    sources: list[bytes] = []
    sizes: list[Size] = []
    captions: list[str] = []
    files: list[str] = []
    hashed: list[tuple[str, bytes]] = []
    named: set[Path] = set()
    records = converted = resized = total_bytes = 0
    for lineno, line in lines:
        records += 1
        where = f"{METADATA_FILENAME} line {lineno}"
        try:
            record = json.loads(line)
        except ValueError as err:
            problems.append(f"{where}: not valid JSON ({err})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        file_name, caption = record.get("file_name"), record.get("text")
        if isinstance(file_name, str) and file_name.strip():
            named.add((root / file_name).resolve())
        bad = False
        if not isinstance(file_name, str) or not file_name.strip():
            problems.append(f'{where}: missing "file_name"')
            bad = True
        if "text" not in record:
            problems.append(f'{where}: missing "text"' + (f" (the caption of {file_name!r})" if not bad else ""))
            bad = True
        elif not isinstance(caption, str) or not caption.strip():
            problems.append(f'{where}: "text" is empty' if isinstance(caption, str) or caption is None
                            else f'{where}: "text" must be a string, got {type(caption).__name__}')
            bad = True
        if bad:
            continue
        rel = Path(file_name)
        path = (root / rel).resolve()
        if rel.is_absolute() or "\\" in file_name or not path.is_relative_to(real_root):
            problems.append(f"{where}: file_name {file_name!r} escapes the dataset folder")
            continue
        if not path.is_file():
            problems.append(f"{where}: file {file_name!r} does not exist")
            continue
        total_bytes += path.stat().st_size
        if total_bytes > limits.max_total_bytes:
            raise DatasetError(root, [f"{where}: the files named up to {file_name!r} take more than "
                                      f"max_dataset_bytes ({limits.max_total_bytes} bytes)"])
        data = read_capped(path, limits.max_file_bytes)
        if data is None:
            problems.append(f"{where}: file {file_name!r} is larger than max_file_bytes ({limits.max_file_bytes} "
                            "bytes)")
            continue
        try:
            # One image decoded at a time, to validate it and pick its bucket; its pixels are not kept.
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
                if max(im.size) > IMAGE_SIZE_LIMIT:
                    problems.append(f"{where}: image {file_name!r} is {im.size[0]}x{im.size[1]}, larger than "
                                    f"{IMAGE_SIZE_LIMIT} px on a side")
                    continue
                mode = im.mode
                rgb_size = _upright_rgb(im).size
        except UnidentifiedImageError as err:
            found = sniff_format(data)
            problems.append(f"{where}: image {file_name!r} is {found}; accepted formats are PNG, JPEG and WEBP"
                            if found else f"{where}: cannot read image {file_name!r} ({type(err).__name__}: {err})")
            continue
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            problems.append(f"{where}: cannot read image {file_name!r} ({type(err).__name__}: {err})")
            continue
        bucket = buckets.pick(*rgb_size)
        if bucket is None:
            smallest = buckets.of_ratio(*rgb_size)[-1]
            problems.append(f"{where}: image {file_name!r} is {rgb_size[0]}x{rgb_size[1]}, smaller than the "
                            f"smallest bucket of its aspect ratio ({smallest[0]}x{smallest[1]}; buckets "
                            f"{buckets.describe()})")
            continue
        converted += mode != "RGB"
        resized += rgb_size != bucket
        sources.append(data)
        sizes.append(bucket)
        captions.append(caption.strip())
        files.append(file_name)
        hashed.append((file_name, data))
    uncaptioned = sorted(p.relative_to(real_root).as_posix() for p in real_root.rglob("*")
                         if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve() not in named)
    problems += [f"image {name!r} has no caption (no {METADATA_FILENAME} line names it)" for name in uncaptioned]
    if not records:
        raise DatasetError(root, [f"{METADATA_FILENAME} has no records"])
    notes = []
    if problems:
        usable = len(captions)
        if not skip_bad_images or not usable:
            hint = (f"{usable} of {records} records are usable; set skip_bad_images: true to train on those"
                    if usable and not skip_bad_images else None)
            raise DatasetError(root, problems, hint)
        notes.append(f"skipped {records - usable} of {records} records and {len(uncaptioned)} uncaptioned "
                     f"image(s) (skip_bad_images): " + "; ".join(problems[:_MAX_REPORTED_PROBLEMS])
                     + (" ..." if len(problems) > _MAX_REPORTED_PROBLEMS else ""))
    if converted:
        notes.append(f"{converted} image(s) converted to RGB")
    if resized:
        notes.append(f"{resized} image(s) resized/centre-cropped to their bucket ({buckets.describe()})")
    return ImageCaptionDataset(sources, sizes, captions, files, dataset_hash(raw, hashed), notes)


def fetch_dataset(url: str, storage_options: dict[str, Any] | None, dest: Path,
                  limits: DatasetLimits = DatasetLimits()) -> Path:
    """A local folder holding the data set at `url`: the folder itself when local, else a download into
    `dest` (metadata.jsonl first, then the files it names, each checked not to escape the prefix). Sizes are
    checked with the store before each download: metadata.jsonl and each file against `limits.max_file_bytes`
    (a larger image is not downloaded; `load_imagefolder` reports it by name), the records against
    `limits.max_records`, and the files in all against `limits.max_total_bytes`."""
    import fsspec
    from fsspec.utils import get_protocol

    if get_protocol(url) in ("file", "local"):
        return Path(url.removeprefix("file://"))
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.exists(root):
        raise DatasetError(url, [f"dataset {url} does not exist"])
    dest.mkdir(parents=True, exist_ok=True)
    try:
        meta_size = fs.size(f"{root}/{METADATA_FILENAME}")
    except FileNotFoundError:
        raise DatasetError(url, [f"{url} has no {METADATA_FILENAME}"]) from None
    if meta_size > limits.max_file_bytes:
        raise DatasetError(url, [f"{METADATA_FILENAME} is larger than max_file_bytes ({limits.max_file_bytes} "
                                 "bytes)"])
    fs.get_file(f"{root}/{METADATA_FILENAME}", str(dest / METADATA_FILENAME))
    lines = [line for line in (dest / METADATA_FILENAME).read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()]
    if len(lines) > limits.max_records:
        raise DatasetError(url, [f"{METADATA_FILENAME} has {len(lines)} records, more than max_dataset_records "
                                 f"({limits.max_records})"])
    total = 0
    for line in lines:
        try:
            name = json.loads(line).get("file_name")
        except (ValueError, AttributeError):
            continue  # reported by load_imagefolder
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
            continue
        try:
            size = fs.size(f"{root}/{name}")
        except FileNotFoundError:
            continue  # reported as missing by load_imagefolder
        total += size
        if total > limits.max_total_bytes:
            raise DatasetError(url, [f"the files named up to {name!r} take more than max_dataset_bytes "
                                     f"({limits.max_total_bytes} bytes)"])
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if size > limits.max_file_bytes:
            # Not downloaded: a placeholder of one byte more than the cap, which load_imagefolder reports by
            # name as too large (it stats before reading).
            with target.open("wb") as f:
                f.truncate(limits.max_file_bytes + 1)
            continue
        try:
            fs.get_file(f"{root}/{name}", str(target))
        except FileNotFoundError:
            continue
    return dest

"""Versioned LoRA adapter registry on top of fsspec (local folder or S3).

Layout under the registry root::

    <tenant>/<name>/v<N>/adapter_model.safetensors
                         adapter_config.json
                         ...any extra files the publisher shipped...
                         manifest.json          <- written LAST

Design choices, and why:

* **The manifest is the commit record.**  A version directory without
  ``manifest.json`` is invisible to ``manifests``/``resolve``/``fetch``.  Publish
  uploads every payload file first and the manifest last; delete removes the
  manifest first.  A publish or delete killed half-way therefore never exposes
  a half-written adapter, on any backend, without needing transactions.
* **Versions are claimed, then filled.**  Publish picks ``max(existing)+1``
  (counting incomplete directories too, so a crashed publish never gets its
  number reused by a later one) and claims it by exclusively creating a small
  marker object, ``.claim.json`` (local: temp file + ``os.link``; S3: a PUT
  with ``If-None-Match: *``).  Two concurrent publishers can therefore never
  write into the same version; the loser retries with the next number.  The
  manifest itself is also written exclusively, which is what makes versions
  immutable.
* **A version number is never reused.**  A delete (and ``gc_incomplete``)
  removes the manifest and the payload but leaves a tombstone,
  ``.deleted.json``, beside the claim, so the version directory stays and the
  next publish counts it: after deleting ``acme/style@v3`` the next version is
  v4, never a second, different v3.  Caches elsewhere may therefore trust that
  a ref names one content; they key on the manifest's checksum as well
  (``AdapterManifest.checksum``), so even a registry wiped and rebuilt by hand
  cannot make them serve other weights under an old ref.
* **Everything is checksummed.**  The manifest records sha256 for every file;
  ``fetch`` verifies each downloaded file and re-uses a local cache only when
  its checksums still match, so a corrupt cache heals itself and a corrupt
  registry object is reported (``AdapterCorrupt``) instead of being loaded.
* **Ids cannot escape the root.**  Tenants, names and versions are validated
  against strict ASCII patterns before any path is built (``fullmatch``, not
  ``$``, so a trailing newline does not slip through; ``[0-9]`` not ``\\d``,
  so non-ASCII digits do not either).

This module deliberately has no Ray import: it is used from the CLI, from
training jobs and from Serve replicas alike.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import get_protocol
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lightray.adapter_files import AdapterFileCache, HeldFiles

__all__ = [
    "AdapterCorrupt",
    "AdapterExists",
    "AdapterIncompatible",
    "AdapterManifest",
    "AdapterNotFound",
    "AdapterRef",
    "AdapterRegistry",
    "AdapterRegistryError",
    "InvalidAdapterRef",
    "MANIFEST_FILENAME",
    "ManifestCache",
    "REQUIRED_FILES",
    "TOMBSTONE_FILENAME",
    "check_compatible",
    "default_cache_dir",
    "latest_versions",
    "sha256_file",
]

log = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
REQUIRED_FILES: tuple[str, ...] = ("adapter_model.safetensors", "adapter_config.json")
# Marker object that reserves a version number.  It is created exclusively
# before any upload and kept after the commit: if it were removed, a publisher
# working from a stale listing could re-claim a committed number and overwrite
# its files before failing on the manifest.  It starts with a dot, so it never
# collides with a publisher's file (dot files are not published) nor with a
# tenant/name (those start alphanumeric).
CLAIM_FILENAME = ".claim.json"
# Marker left by a delete (or by gc of an abandoned publish) in place of the version's files: the version
# directory, and so its number, outlives the version (see "A version number is never reused" above).
TOMBSTONE_FILENAME = ".deleted.json"
_MARKERS = (CLAIM_FILENAME, TOMBSTONE_FILENAME)

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# Positive integers without leading zeros, so every version has exactly one
# spelling ("v3", never "v03"); 9 digits is plenty and keeps ints small.
_VERSION_RE = re.compile(r"v?([1-9][0-9]{0,8})")
_VERSION_DIR_RE = re.compile(r"v([1-9][0-9]{0,8})")
_HASH_CHUNK = 1 << 20
_MAX_CLAIM_ATTEMPTS = 16


# --------------------------------------------------------------------------- errors


class AdapterRegistryError(Exception):
    """Base class for every error raised by the registry."""


class InvalidAdapterRef(AdapterRegistryError, ValueError):
    """A tenant, name, version or ref string failed validation."""


class AdapterNotFound(AdapterRegistryError, KeyError):
    """No complete (manifest-bearing) version matches the ref."""

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterExists(AdapterRegistryError, FileExistsError):
    """Attempt to (re)write a version that already exists: versions are immutable."""


class AdapterCorrupt(AdapterRegistryError):
    """Stored or downloaded bytes do not match the manifest (or the manifest is unreadable)."""


class AdapterIncompatible(AdapterRegistryError, ValueError):
    """The adapter was trained for a different base model than the one asked about."""


# --------------------------------------------------------------------------- validation


def _validate_component(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidAdapterRef(f"{what} must be a string, got {type(value).__name__}")
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise InvalidAdapterRef(
            f"invalid {what} {value!r}: use 1-63 chars of [a-z0-9_.-], "
            "starting with a letter or digit, without '..'"
        )
    return value


def validate_tenant(tenant: object) -> str:
    """Return ``tenant`` if it is a safe path component, else raise ``InvalidAdapterRef``."""
    return _validate_component(tenant, "tenant")


def validate_name(name: object) -> str:
    """Return ``name`` if it is a safe path component, else raise ``InvalidAdapterRef``."""
    return _validate_component(name, "adapter name")


def parse_version(value: object) -> int:
    """Parse ``"v3"``, ``"3"`` or ``3`` into ``3``; anything else is ``InvalidAdapterRef``."""
    if isinstance(value, bool):  # bool is an int subclass; True is not "v1"
        raise InvalidAdapterRef(f"invalid version {value!r}")
    if isinstance(value, int):
        if 1 <= value <= 999_999_999:
            return value
        raise InvalidAdapterRef(f"invalid version {value!r}: must be a positive integer")
    if isinstance(value, str):
        m = _VERSION_RE.fullmatch(value)
        if m:
            return int(m.group(1))
    raise InvalidAdapterRef(f"invalid version {value!r}: expected 'v<N>' with N >= 1")


def version_tag(version: int) -> str:
    """Directory/display form of a version number: ``3 -> "v3"``."""
    return f"v{version}"


@dataclass(frozen=True)
class AdapterRef:
    """A parsed ``tenant/name[@vN]`` reference (``version=None`` means latest)."""

    tenant: str
    name: str
    version: int | None = None

    def __post_init__(self) -> None:
        validate_tenant(self.tenant)
        validate_name(self.name)
        if self.version is not None and (
            not isinstance(self.version, int) or isinstance(self.version, bool)
        ):
            raise InvalidAdapterRef(f"version must be an int, got {self.version!r}")
        if self.version is not None:
            parse_version(self.version)

    @classmethod
    def parse(cls, ref: str | AdapterRef) -> AdapterRef:
        """Parse ``tenant/name``, ``tenant/name@v3`` or ``tenant/name@3``.

        The grammar is intentionally tiny: exactly one ``/``, at most one
        ``@``, and every piece validated, so no spelling of a ref can denote a
        path outside ``<root>/<tenant>/<name>/``.
        """
        if isinstance(ref, AdapterRef):
            return ref
        if not isinstance(ref, str):
            raise InvalidAdapterRef(f"adapter ref must be a string, got {type(ref).__name__}")
        base, sep, ver = ref.partition("@")
        if sep and (not ver or "@" in ver):
            raise InvalidAdapterRef(f"invalid adapter ref {ref!r}: expected tenant/name[@vN]")
        parts = base.split("/")
        if len(parts) != 2:
            raise InvalidAdapterRef(f"invalid adapter ref {ref!r}: expected tenant/name[@vN]")
        try:
            return cls(
                validate_tenant(parts[0]),
                validate_name(parts[1]),
                parse_version(ver) if sep else None,
            )
        except InvalidAdapterRef as err:
            raise InvalidAdapterRef(f"invalid adapter ref {ref!r}: {err}") from None

    def with_version(self, version: int) -> AdapterRef:
        return AdapterRef(self.tenant, self.name, version)

    def __str__(self) -> str:
        base = f"{self.tenant}/{self.name}"
        return base if self.version is None else f"{base}@{version_tag(self.version)}"


# --------------------------------------------------------------------------- manifest


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AdapterManifest(BaseModel):
    """Everything needed to decide whether, and how, to load an adapter.

    Stored as ``manifest.json`` next to the adapter files.  Unknown keys are
    ignored on read so that manifests written by newer code remain readable.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    tenant: str
    name: str
    version: int = Field(ge=1)
    base_model_id: str = Field(min_length=1)
    base_fingerprint: str = ""
    base_family: str = ""
    """The model family of the base (`lightray.models.FAMILIES`, e.g. "qwen-image-2.1"), recorded by the trainer:
    an adapter for another family's transformer cannot load at all. Empty when unknown (older manifests, pushes
    without `--base-family`): only `base_model_id` is checked then."""
    rank: int | None = Field(default=None, ge=1)
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    trigger_words: list[str] = Field(default_factory=list)
    training_config: dict[str, Any] = Field(default_factory=dict)
    dataset_hash: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=_utcnow)
    visibility: Literal["private", "public"] = "private"

    @field_validator("tenant")
    @classmethod
    def _check_tenant(cls, v: str) -> str:
        return validate_tenant(v)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return validate_name(v)

    @field_validator("created_at")
    @classmethod
    def _check_utc(cls, v: datetime) -> datetime:
        # Naive datetimes are ambiguous across machines; we only store UTC.
        if v.tzinfo is None:
            return v.replace(tzinfo=timezone.utc)
        return v.astimezone(timezone.utc)

    @field_validator("files")
    @classmethod
    def _check_files(cls, v: dict[str, str]) -> dict[str, str]:
        for rel, digest in v.items():
            _validate_relpath(rel)
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"file {rel!r}: sha256 must be 64 lowercase hex chars")
        return v

    @property
    def tag(self) -> str:
        """``"v3"``."""
        return version_tag(self.version)

    @property
    def ref(self) -> str:
        """Fully pinned ref, ``"tenant/name@v3"``."""
        return f"{self.tenant}/{self.name}@{self.tag}"

    @property
    def checksum(self) -> str:
        """sha256 of the manifest as ``publish`` stores it (``stored_bytes``); it lists every file's sha256, so it
        names the content. Caches key on it, not on the ref alone. Computed from the fields, so every process
        running this code gets the same checksum for one manifest."""
        return hashlib.sha256(self.stored_bytes()).hexdigest()

    def stored_bytes(self) -> bytes:
        """The bytes ``publish`` writes as ``manifest.json``."""
        return self.model_dump_json(indent=2).encode()


# Fields a publisher may set; the rest (identity, files, created_at) are the
# registry's to fill in.
PUBLISHER_FIELDS = frozenset(AdapterManifest.model_fields) - {
    "schema_version",
    "tenant",
    "name",
    "version",
    "files",
    "created_at",
}


def _validate_relpath(rel: str) -> str:
    """A manifest file key: relative POSIX path, no traversal, no hidden parts."""
    parts = rel.split("/")
    if (
        not rel
        or "\\" in rel
        or "\x00" in rel
        or rel == MANIFEST_FILENAME
        or any(p in ("", ".", "..") or p.startswith(".") for p in parts)
    ):
        raise ValueError(f"invalid file path in manifest: {rel!r}")
    return rel


def check_compatible(
    manifest: AdapterManifest,
    base_model_id: str,
    base_fingerprint: str | None = None,
    *,
    require_fingerprint: bool = False,
) -> None:
    """Raise ``AdapterIncompatible`` unless ``manifest`` targets this base model.

    The model id must match exactly.  Fingerprints are compared when both
    sides know one (an adapter published without a fingerprint, or a server
    that cannot compute its own, falls back to the id check), unless
    ``require_fingerprint`` demands that both are present: use that where a
    same-named base with different weights (re-distilled, re-quantised) is a
    real risk.
    """
    if manifest.base_model_id != base_model_id:
        raise AdapterIncompatible(
            f"{manifest.ref} was trained for base model {manifest.base_model_id!r}, "
            f"not {base_model_id!r}"
        )
    have, want = manifest.base_fingerprint, base_fingerprint or ""
    if require_fingerprint and not (have and want):
        raise AdapterIncompatible(
            f"{manifest.ref}: base fingerprint required but "
            f"{'the adapter' if not have else 'the caller'} has none"
        )
    if have and want and have != want:
        raise AdapterIncompatible(
            f"{manifest.ref} was trained for base fingerprint {have!r}, "
            f"but the loaded base has {want!r}"
        )


# --------------------------------------------------------------------------- helpers


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, streamed so multi-GB adapters do not load into RAM."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$LIGHTRAY_ADAPTER_CACHE``, else ``$XDG_CACHE_HOME/lightray/adapters``, else ``~/.cache/...``."""
    env = os.environ.get("LIGHTRAY_ADAPTER_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "lightray" / "adapters"


def _peft_defaults(config_path: Path) -> dict[str, Any]:
    """Manifest defaults read from a peft ``adapter_config.json``.

    Saves publishers from repeating what the trainer already recorded; any
    explicitly passed field wins.  A config we cannot parse yields nothing:
    the adapter files are otherwise treated as opaque.
    """
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(cfg.get("base_model_name_or_path"), str) and cfg["base_model_name_or_path"]:
        out["base_model_id"] = cfg["base_model_name_or_path"]
    if isinstance(cfg.get("r"), int) and not isinstance(cfg["r"], bool) and cfg["r"] > 0:
        out["rank"] = cfg["r"]
    if isinstance(cfg.get("lora_alpha"), (int, float)) and not isinstance(cfg["lora_alpha"], bool):
        out["alpha"] = float(cfg["lora_alpha"])
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        out["target_modules"] = [tm]  # peft allows a regex string
    elif isinstance(tm, list) and all(isinstance(t, str) for t in tm):
        out["target_modules"] = sorted(tm)
    return out


def _mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time (epoch s) from an fsspec info dict, across backends."""
    mt = info.get("mtime")
    if isinstance(mt, (int, float)):
        return float(mt)
    for key in ("LastModified", "last_modified", "updated"):
        lm = info.get(key)
        if isinstance(lm, datetime):
            return lm.timestamp()
    return None


def latest_versions(manifests: Sequence[AdapterManifest]) -> list[AdapterManifest]:
    """The latest version of each adapter among ``manifests`` (sorted by tenant, name, version), in that order."""
    latest: dict[tuple[str, str], AdapterManifest] = {}
    for m in manifests:
        latest[(m.tenant, m.name)] = m
    return list(latest.values())


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ManifestCache:
    """How long `AdapterRegistry.resolve` (and `catalog`) may answer from memory instead of reading the store (on
    S3, a listing and a GET per request otherwise).

    Every answer is kept for `ttl_s`, whatever it was: a manifest (pinned `t/n@v3` or `latest` `t/n`), "not found"
    or "corrupt". So a ref that exists and one that does not take the same path and the same time (no timing
    oracle on another tenant's private adapters), and a version deleted through another process (the CLI, another
    ingress) is refused everywhere within `ttl_s`. A publish or delete through the same registry object takes
    effect at once.
    """

    ttl_s: float = 2.0
    """Seconds an answer is re-used; 0: every lookup reads the store."""
    max_entries: int = 4096
    """Answers kept (least recently used dropped first), so memory stays bounded however many refs are asked
    about, existing or not."""

    def __post_init__(self) -> None:
        if self.ttl_s < 0 or self.max_entries < 1:
            raise ValueError(f"invalid manifest cache {self}")


_Answer = AdapterManifest | AdapterRegistryError
"""What a manifest lookup came to: the manifest, or the error to raise (`AdapterNotFound`, `AdapterCorrupt`)."""


class AdapterRegistry:
    """Publish, resolve, fetch and delete versioned adapters under one root.

    ``root`` is any fsspec URL: ``./registry``, ``/data/registry``,
    ``s3://bucket/prefix``.  ``storage_options`` go to the filesystem (for s3fs:
    ``key``, ``secret``, ``client_kwargs={"endpoint_url": ...}``).  For remote
    backends the listings cache is off by default: other processes publish
    concurrently and a cached listing would hide their versions.
    ``manifest_cache`` lets ``resolve`` answer from memory (``ManifestCache``);
    None: every ``resolve`` reads the store.  ``cache_max_bytes`` bounds the
    local file cache under ``cache_dir`` (``lightray.adapter_files``); None:
    unbounded.
    """

    def __init__(
        self,
        root: str = "./registry",
        storage_options: Mapping[str, Any] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        manifest_cache: ManifestCache | None = None,
        cache_max_bytes: int | None = None,
    ) -> None:
        opts = dict(storage_options or {})
        if get_protocol(str(root)) not in ("file", "local"):
            opts.setdefault("use_listings_cache", False)
        self.root_url = str(root)
        self.fs, root_path = fsspec.core.url_to_fs(self.root_url, **opts)
        self.root = root_path.rstrip("/") or root_path
        self._local = isinstance(self.fs, LocalFileSystem)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        # Cache entries are namespaced by registry so two registries holding
        # the same tenant/name@vN never thrash each other's cache.
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._cache_ns = hashlib.sha256(f"{proto}://{self.root}".encode()).hexdigest()[:16]
        self.file_cache = AdapterFileCache(self.cache_dir / self._cache_ns, cache_max_bytes)
        self.manifest_cache = manifest_cache
        # (tenant, name, version or None for latest) -> (time.monotonic() when looked up, the answer then).
        self._answers: OrderedDict[tuple[str, str, int | None], tuple[float, _Answer]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._catalog: tuple[float, list[AdapterManifest]] | None = None
        self._catalog_lock = threading.Lock()  # one catalog read at a time; the others wait for its answer

    def __repr__(self) -> str:
        return f"AdapterRegistry({self.root_url!r})"

    # ---- paths (only ever built from validated components)

    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _name_dir(self, tenant: str, name: str) -> str:
        return self._path(tenant, name)

    def _version_dir(self, tenant: str, name: str, version: int) -> str:
        return self._path(tenant, name, version_tag(version))

    def _manifest_path(self, tenant: str, name: str, version: int) -> str:
        return posixpath.join(self._version_dir(tenant, name, version), MANIFEST_FILENAME)

    def cache_path(self, manifest: AdapterManifest) -> Path:
        """Local folder ``fetch`` uses for a version: named by its manifest's checksum too, so files cached for
        one content are never taken for another's under the same ref."""
        return (self.cache_dir / self._cache_ns / manifest.tenant / manifest.name
                / f"{manifest.tag}-{manifest.checksum[:16]}")

    # ---- low-level storage helpers

    def _fresh(self) -> None:
        """Drop cached listings: another process may have published since."""
        self.fs.invalidate_cache()

    def _ls_dirs(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [
            posixpath.basename(e["name"].rstrip("/"))
            for e in entries
            if e.get("type") == "directory"
        ]

    def _parse_version_path(self, path: str) -> tuple[tuple[str, str, int], list[str]] | None:
        """``<root>/<tenant>/<name>/v<N>[/rest...]`` as ((tenant, name, N), rest parts); None for any other path
        (outside the root, above a version directory, or with components that fail validation)."""
        prefix = self.root + "/"
        if not path.startswith(prefix):
            return None
        parts = path[len(prefix) :].split("/")
        if len(parts) < 3:
            return None
        t, n, vdir = parts[:3]
        vm = _VERSION_DIR_RE.fullmatch(vdir)
        if not vm or not _NAME_RE.fullmatch(t) or not _NAME_RE.fullmatch(n) or ".." in t + n:
            return None
        return (t, n, int(vm.group(1))), parts[3:]

    def _version_numbers(self, tenant: str, name: str) -> list[int]:
        """All version dirs, complete or not, ascending."""
        self._fresh()
        out = []
        for d in self._ls_dirs(self._name_dir(tenant, name)):
            m = _VERSION_DIR_RE.fullmatch(d)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def _write_exclusive(self, path: str, data: bytes) -> None:
        """Create ``path`` with ``data``; ``FileExistsError`` if it already exists.

        Local: write a temp file, then ``os.link`` it into place - atomic and
        exclusive, so readers never see a half-written manifest.  S3: a single
        PUT with ``If-None-Match: *`` (AWS, SeaweedFS, MinIO support it).
        Other fsspec backends fall back to a (racy) exists-then-write.
        """
        if self._local:
            self._write_exclusive_local(path, data)
            return
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            raise
        except OSError as err:
            # s3fs maps a 412 to FileExistsError only when the server names
            # the failed condition; SeaweedFS/MinIO do not, giving EINVAL.
            if err.errno == errno.EINVAL or "precondition" in str(err).lower().replace("-", ""):
                self.fs.invalidate_cache(path)
                if self.fs.exists(path):
                    raise FileExistsError(path) from err
            raise

    @staticmethod
    def _write_exclusive_local(path: str, data: bytes) -> None:
        # Hidden name: a crash between write and unlink leaves only a dot-file,
        # which nothing in the registry ever reads.
        head, tail = os.path.split(path)
        tmp = os.path.join(head, f".{tail}.tmp-{secrets.token_hex(6)}")
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:
            # Filesystems without hard links (some FUSE mounts): still
            # exclusive via O_EXCL, just not atomic for concurrent readers.
            with open(path, "xb") as f:
                f.write(data)
        finally:
            os.unlink(tmp)

    def _read_manifest(self, tenant: str, name: str, version: int) -> AdapterManifest | None:
        """The manifest of one version, ``None`` if it has none (incomplete/absent)."""
        path = self._manifest_path(tenant, name, version)
        try:
            raw = self.fs.cat_file(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        return self._parse_manifest(raw, tenant, name, version, path)

    @staticmethod
    def _parse_manifest(
        raw: bytes, tenant: str, name: str, version: int, where: str
    ) -> AdapterManifest:
        try:
            m = AdapterManifest.model_validate_json(raw)
        except ValueError as err:
            raise AdapterCorrupt(f"unreadable manifest {where}: {err}") from err
        if (m.tenant, m.name, m.version) != (tenant, name, version):
            # A manifest copied into the wrong place would otherwise let one
            # tenant's ref serve another tenant's files.
            raise AdapterCorrupt(
                f"manifest {where} claims to be {m.ref}, not {tenant}/{name}@{version_tag(version)}"
            )
        return m

    # ---- public API

    def publish(
        self,
        tenant: str,
        name: str,
        src_dir: str | os.PathLike[str],
        *,
        version: int | str | None = None,
        **manifest_fields: Any,
    ) -> AdapterManifest:
        """Upload ``src_dir`` as the next version of ``tenant/name``; return its manifest.

        ``src_dir`` must contain ``adapter_model.safetensors`` and
        ``adapter_config.json``; every other regular file is published too
        (recursively), except dot-files and a stale ``manifest.json``.
        ``manifest_fields`` are ``AdapterManifest`` fields (``base_model_id``,
        ``trigger_words``, ...); missing ``base_model_id``/``rank``/``alpha``/
        ``target_modules`` default to the peft ``adapter_config.json`` values.

        ``version`` pins the number instead of auto-incrementing (for mirroring
        registries); it raises ``AdapterExists`` if that version exists.
        """
        validate_tenant(tenant)
        validate_name(name)
        pinned = parse_version(version) if version is not None else None
        unknown = set(manifest_fields) - PUBLISHER_FIELDS
        if unknown:
            raise TypeError(f"publish() got unexpected manifest fields: {sorted(unknown)}")

        src = Path(src_dir)
        if not src.is_dir():
            raise FileNotFoundError(f"adapter source dir {src} does not exist")
        files = self._collect_files(src)
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise ValueError(f"{src} is missing required adapter files: {missing}")

        fields = {**_peft_defaults(src / "adapter_config.json"), **manifest_fields}
        digests = {rel: sha256_file(p) for rel, p in files.items()}
        # Validate all metadata before touching storage: a bad field should
        # not leave a claimed-but-empty version behind.
        AdapterManifest(tenant=tenant, name=name, version=1, files=digests, **fields)

        v = self._claim_version(tenant, name, pinned)
        vdir = self._version_dir(tenant, name, v)
        manifest = AdapterManifest(tenant=tenant, name=name, version=v, files=digests, **fields)

        for rel, local in files.items():
            remote = posixpath.join(vdir, rel)
            if self._local:
                self.fs.makedirs(posixpath.dirname(remote), exist_ok=True)
            self.fs.put_file(str(local), remote)
            # Cheap guard against truncated uploads before we commit.
            stored, expected_size = self.fs.size(remote), local.stat().st_size
            if stored != expected_size:
                raise AdapterCorrupt(
                    f"upload of {rel} to {remote} stored {stored} bytes, expected {expected_size}"
                )

        # The commit point: from here on the version is visible.
        try:
            self._write_exclusive(posixpath.join(vdir, MANIFEST_FILENAME), manifest.stored_bytes())
        except FileExistsError as err:
            raise AdapterExists(f"{manifest.ref} already exists; versions are immutable") from err
        self._forget(tenant, name)
        log.info("published %s (%d files)", manifest.ref, len(digests))
        return manifest

    @staticmethod
    def _collect_files(src: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if any(part.startswith(".") for part in rel.parts):
                continue  # .DS_Store, .ipynb_checkpoints, our own temp files
            if rel.as_posix() == MANIFEST_FILENAME:
                continue  # the registry writes its own; a fetched dir can be republished
            if p.is_file():
                out[_validate_relpath(rel.as_posix())] = p
        return out

    def _claim_version(self, tenant: str, name: str, pinned: int | None) -> int:
        """Reserve a version number by exclusively creating its claim marker."""
        self.fs.makedirs(self._name_dir(tenant, name), exist_ok=True)
        claim = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "started_at": _utcnow().isoformat()}
        ).encode()
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            if pinned is not None:
                v = pinned
                if v in self._version_numbers(tenant, name):
                    raise AdapterExists(
                        f"{tenant}/{name}@{version_tag(v)} already exists (or is being "
                        "published); versions are immutable"
                    )
            else:
                v = max(self._version_numbers(tenant, name), default=0) + 1
            vdir = self._version_dir(tenant, name, v)
            if self._local:
                self.fs.makedirs(vdir, exist_ok=True)
            try:
                self._write_exclusive(posixpath.join(vdir, CLAIM_FILENAME), claim)
                return v
            except FileExistsError:
                if pinned is not None:
                    raise AdapterExists(
                        f"{tenant}/{name}@{version_tag(v)} is already being published"
                    ) from None
                continue  # lost a race with a concurrent publisher: next number
        raise AdapterRegistryError(
            f"could not claim a version of {tenant}/{name} after {_MAX_CLAIM_ATTEMPTS} attempts"
        )

    def resolve(self, ref: str | AdapterRef) -> AdapterManifest:
        """Manifest for ``tenant/name@vN``, or the latest complete version of ``tenant/name``.

        A latest-lookup skips (and logs) versions whose manifest is corrupt so
        one bad upload does not take the whole adapter offline; a pinned
        lookup of a corrupt version raises ``AdapterCorrupt``.  With a
        ``manifest_cache`` the answer, found or not, may come from memory
        (``ManifestCache`` says for how long).
        """
        r = AdapterRef.parse(ref)
        answer = self._cached_answer(r)
        if answer is None:
            answer = self._look_up(r)
            self._remember(r, answer)
        if isinstance(answer, AdapterRegistryError):
            raise type(answer)(*answer.args)  # a fresh exception: a cached one would pile up tracebacks
        return answer

    def _look_up(self, r: AdapterRef) -> _Answer:
        """What the store says about ``r`` now."""
        if r.version is not None:
            try:
                m = self._read_manifest(r.tenant, r.name, r.version)
            except AdapterCorrupt as err:
                return err
            return m if m is not None else AdapterNotFound(f"adapter {r} not found")
        numbers = self._version_numbers(r.tenant, r.name)
        for v in reversed(numbers):
            try:
                m = self._read_manifest(r.tenant, r.name, v)
            except AdapterCorrupt as err:
                log.warning("skipping corrupt version: %s", err)
                continue
            if m is not None:
                return m
        if not numbers:
            # An adapter that does not exist costs what one that does costs (a listing and a manifest read), so
            # the time a miss takes does not tell another tenant's private adapter from an absent one.
            self._read_manifest(r.tenant, r.name, 1)
        return AdapterNotFound(f"adapter {r} not found")

    def _cached_answer(self, r: AdapterRef) -> _Answer | None:
        policy = self.manifest_cache
        if policy is None:
            return None
        key = (r.tenant, r.name, r.version)
        with self._cache_lock:
            entry = self._answers.get(key)
            if entry is None or time.monotonic() - entry[0] >= policy.ttl_s:
                return None
            self._answers.move_to_end(key)
            return entry[1]

    def _remember(self, r: AdapterRef, answer: _Answer) -> None:
        policy = self.manifest_cache
        if policy is None:
            return
        now = time.monotonic()
        key = (r.tenant, r.name, r.version)
        with self._cache_lock:
            # Only under the ref asked for: a `latest` answer filling in its pinned version too would make that
            # version's first lookup faster than an absent one's.
            self._answers[key] = (now, answer)
            self._answers.move_to_end(key)
            while len(self._answers) > policy.max_entries:
                self._answers.popitem(last=False)

    def _forget(self, tenant: str, name: str, versions: Sequence[int] = ()) -> None:
        """Drop what this object cached about ``tenant/name`` (its latest, and ``versions``), after its own
        publish or delete."""
        with self._cache_lock:
            for key in [(tenant, name, None), *((tenant, name, v) for v in versions)]:
                self._answers.pop(key, None)
            self._catalog = None

    def catalog(self) -> list[AdapterManifest]:
        """Every complete version of every tenant (``manifests()``), re-read at most once per the manifest cache's
        ``ttl_s``; concurrent callers share one read. For listings served to many callers (``GET /v1/adapters``),
        which filter and page it in memory. Without a manifest cache, every call reads the store."""
        policy = self.manifest_cache
        with self._catalog_lock:
            cached = self._catalog
            if policy is not None and cached is not None and time.monotonic() - cached[0] < policy.ttl_s:
                return cached[1]
            read_at = time.monotonic()
            listing = self.manifests()
            if policy is not None:
                self._catalog = (read_at, listing)
            return listing

    def versions(self, ref: str | AdapterRef) -> list[int]:
        """Complete version numbers of ``tenant/name``, ascending."""
        r = AdapterRef.parse(ref)
        return [m.version for m in self.manifests(r.tenant) if m.name == r.name]

    def manifests(self, tenant: str | None = None, *, latest_only: bool = False) -> list[AdapterManifest]:
        """Manifests of every complete version (of one tenant), sorted by ref.

        One recursive listing plus a batched read of the manifests, rather than
        a directory walk, because on S3 each directory level is a round trip.
        """
        base = self._path(validate_tenant(tenant)) if tenant is not None else self.root
        self._fresh()
        try:
            paths = self.fs.find(base)
        except FileNotFoundError:
            return []
        wanted: dict[str, tuple[str, str, int]] = {}
        for p in paths:
            parsed = self._parse_version_path(p)
            if parsed is None or parsed[1] != [MANIFEST_FILENAME]:
                continue
            key = parsed[0]
            if tenant is not None and key[0] != tenant:  # S3 prefix "acme" also matches "acme2/"
                continue
            wanted[p] = key
        if not wanted:
            return []
        raw = self.fs.cat(list(wanted), on_error="return")
        out: list[AdapterManifest] = []
        for p, (t, n, v) in wanted.items():
            data = raw.get(p)
            if not isinstance(data, bytes):  # deleted since the listing, or unreadable
                continue
            try:
                out.append(self._parse_manifest(data, t, n, v, p))
            except AdapterCorrupt as err:
                log.warning("skipping corrupt version: %s", err)
        out.sort(key=lambda m: (m.tenant, m.name, m.version))
        return latest_versions(out) if latest_only else out

    def delete(self, ref: str | AdapterRef) -> list[str]:
        """Delete one version (``t/n@vN``) or every version (``t/n``); return deleted refs.

        Each version gets its tombstone first (its number is then never
        reused, even if the delete dies next), then loses its manifest (the
        commit point: from here on it is invisible), then its files.  A delete
        killed half-way leaves at worst an invisible version with files (whose
        files ``gc_incomplete`` reclaims), never a visible version with
        missing files.  For a whole adapter the oldest versions go first, so an
        interrupted delete keeps serving the same latest version it did before.
        """
        r = AdapterRef.parse(ref)
        self._fresh()
        candidates = [r.version] if r.version is not None else self._version_numbers(r.tenant, r.name)
        targets = [v for v in candidates if self.fs.exists(self._manifest_path(r.tenant, r.name, v))]
        if not targets:
            raise AdapterNotFound(f"adapter {r} not found")

        for v in targets:
            self._bury(r.tenant, r.name, v)
            self.fs.rm_file(self._manifest_path(r.tenant, r.name, v))
        self._forget(r.tenant, r.name, targets)
        for v in targets:
            self._remove_payload(r.tenant, r.name, v)
        deleted = [str(r.with_version(v)) for v in targets]
        log.info("deleted %s", ", ".join(deleted))
        return deleted

    def _bury(self, tenant: str, name: str, version: int) -> None:
        """Write the version's tombstone: its directory, so its number, stays claimed for good."""
        record = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                             "deleted_at": _utcnow().isoformat()}).encode()
        path = posixpath.join(self._version_dir(tenant, name, version), TOMBSTONE_FILENAME)
        if self._local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, record)

    def _remove_payload(self, tenant: str, name: str, version: int) -> bool:
        """Remove every file of a version but its markers (claim, tombstone); whether there was any."""
        vdir = self._version_dir(tenant, name, version)
        try:
            found = self.fs.find(vdir)
        except FileNotFoundError:
            return False
        payload = [p for p in found if posixpath.basename(p) not in _MARKERS]
        if payload:
            self.fs.rm(payload)  # a local folder may keep empty sub-folders: no listing counts them
        return bool(payload)

    def fetch(
        self,
        ref: str | AdapterRef,
        dest_dir: str | os.PathLike[str] | None = None,
        *,
        base_model_id: str | None = None,
        base_fingerprint: str | None = None,
    ) -> tuple[AdapterManifest, Path]:
        """Download (or re-use a verified local copy of) an adapter; return it and its dir.

        Every file is checked against the manifest's sha256; cached files that
        still match are not downloaded again, ones that do not are replaced.
        A mismatch right after download raises ``AdapterCorrupt``.  Files land
        via temp-file + rename, so concurrent fetchers of the same version and
        readers of the cache never see partial files.  ``dest_dir`` receives
        the files plus ``manifest.json``; other files already in it are left
        alone.  Passing ``base_model_id`` checks compatibility before any
        download.  Without ``dest_dir`` the files go to the local cache
        (``cache_path``), which may evict them once they are not in use: a
        caller that keeps using them holds them with ``checkout`` instead.
        """
        if dest_dir is None:
            m, held = self.checkout(ref, base_model_id=base_model_id, base_fingerprint=base_fingerprint)
            held.release()
            return m, held.path
        m = self._resolve_compatible(ref, base_model_id, base_fingerprint)
        dest = Path(dest_dir)
        self._download(m, dest)
        return m, dest

    def checkout(
        self,
        ref: str | AdapterRef,
        *,
        base_model_id: str | None = None,
        base_fingerprint: str | None = None,
    ) -> tuple[AdapterManifest, HeldFiles]:
        """``fetch`` into the local cache, holding the files in use (no process evicts them) until the returned
        ``HeldFiles`` is released; then trim the cache to its bound (``cache_max_bytes``), least recently used
        entries first."""
        m = self._resolve_compatible(ref, base_model_id, base_fingerprint)
        held = self.file_cache.hold(self.cache_path(m))
        try:
            self._download(m, held.path)
            self.file_cache.trim()
        except BaseException:
            held.release()
            raise
        return m, held

    def _resolve_compatible(self, ref: str | AdapterRef, base_model_id: str | None,
                            base_fingerprint: str | None) -> AdapterManifest:
        m = self.resolve(ref)
        if base_model_id is not None:
            check_compatible(m, base_model_id, base_fingerprint)
        return m

    def _download(self, m: AdapterManifest, dest: Path) -> None:
        """Make ``dest`` hold ``m``'s files, each verified (see ``fetch``), and its manifest."""
        dest.mkdir(parents=True, exist_ok=True)
        vdir = self._version_dir(m.tenant, m.name, m.version)

        for rel, expected in sorted(m.files.items()):
            local = dest / rel
            if local.is_file() and sha256_file(local) == expected:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            part = local.with_name(f".{local.name}.part-{secrets.token_hex(6)}")
            try:
                try:
                    self.fs.get_file(posixpath.join(vdir, rel), str(part))
                except FileNotFoundError as err:
                    raise AdapterCorrupt(f"{m.ref}: file {rel!r} listed in manifest is missing") from err
                actual = sha256_file(part)
                if actual != expected:
                    raise AdapterCorrupt(
                        f"{m.ref}: checksum mismatch for {rel!r}: expected {expected}, got {actual}"
                    )
                os.replace(part, local)
            finally:
                part.unlink(missing_ok=True)

        manifest_bytes = m.stored_bytes()
        mpath = dest / MANIFEST_FILENAME
        if not (mpath.is_file() and mpath.read_bytes() == manifest_bytes):
            tmp = dest / f".{MANIFEST_FILENAME}.part-{secrets.token_hex(6)}"
            tmp.write_bytes(manifest_bytes)
            os.replace(tmp, mpath)

    def gc_incomplete(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove the files of version dirs that have no manifest and saw no write for ``older_than_s``.

        These are left by publishes that died before their commit point (or
        deletes that died after theirs).  The directory keeps its claim and a
        tombstone, so its number is never reused.  Age is the newest modification time
        of anything inside, so a slow upload still in progress is spared as
        long as ``older_than_s`` exceeds the time to upload one file.  Returns
        the refs removed.
        """
        now = time.time()
        self._fresh()
        try:
            entries = self.fs.find(self.root, withdirs=True, detail=True)
        except FileNotFoundError:
            return []
        newest: dict[tuple[str, str, int], float] = {}
        undated: set[tuple[str, str, int]] = set()
        complete: set[tuple[str, str, int]] = set()
        has_payload: set[tuple[str, str, int]] = set()  # files besides the markers: something to reclaim
        for p, info in entries.items():
            parsed = self._parse_version_path(p)
            if parsed is None:
                continue
            key, rest = parsed
            if rest == [MANIFEST_FILENAME]:
                complete.add(key)
            if rest and rest[-1] not in _MARKERS and info.get("type") != "directory":
                has_payload.add(key)
            mt = _mtime(info)
            if mt is not None:
                newest[key] = max(newest.get(key, 0.0), mt)
            elif info.get("type") != "directory":
                # Object stores give prefixes ("directories") no date; that is
                # fine.  A file we cannot date we never delete.
                undated.add(key)
        removed: list[str] = []
        for key, mt in sorted(newest.items()):
            if key in complete or key in undated or key not in has_payload or now - mt < older_than_s:
                continue
            t, n, v = key
            if self.fs.exists(self._manifest_path(t, n, v)):  # committed meanwhile
                continue
            self._bury(t, n, v)  # the number stays taken: never reused
            if self._remove_payload(t, n, v):
                removed.append(str(AdapterRef(t, n, v)))
        if removed:
            log.info("gc removed incomplete versions: %s", ", ".join(removed))
        return removed

    # Convenience alias so callers holding a registry need no second import.
    check_compatible = staticmethod(check_compatible)

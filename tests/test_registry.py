"""Adapter registry tests, run against a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lightray import adapters_cli
from lightray.adapter_files import LOCK_FILENAME
from lightray.registry import (
    CLAIM_FILENAME,
    TOMBSTONE_FILENAME,
    AdapterCorrupt,
    AdapterExists,
    AdapterIncompatible,
    AdapterManifest,
    AdapterNotFound,
    AdapterRef,
    AdapterRegistry,
    InvalidAdapterRef,
    check_compatible,
)

pytest_plugins = ["conftest_registry"]

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE = "Qwen/Qwen-Image-Lightning"


# --------------------------------------------------------------------------- fixtures


@dataclass
class Backend:
    kind: str
    root: str
    storage_options: dict[str, Any] | None

    def registry(self, cache_dir: Path) -> AdapterRegistry:
        return AdapterRegistry(self.root, self.storage_options, cache_dir=cache_dir)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should open this registry."""
        env = {**os.environ, "LIGHTRAY_REGISTRY": self.root, "PYTHONPATH": str(REPO_ROOT)}
        if self.storage_options:
            env["LIGHTRAY_REGISTRY_STORAGE_OPTIONS"] = json.dumps(self.storage_options)
        return env


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return Backend("local", str(tmp_path / "registry"), None)
    server = request.getfixturevalue("s3_server")
    return Backend("s3", request.getfixturevalue("s3_prefix"), server.storage_options)


@pytest.fixture
def reg(backend: Backend, tmp_path: Path) -> AdapterRegistry:
    return backend.registry(tmp_path / "cache")


@pytest.fixture
def local_reg(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")


MakeAdapter = Callable[..., Path]


@pytest.fixture
def make_adapter(tmp_path: Path) -> MakeAdapter:
    """Create a small peft-style adapter dir with distinct content per call."""
    counter = iter(range(1_000_000))

    def make(extra: dict[str, bytes] | None = None, config: dict[str, Any] | None = None) -> Path:
        i = next(counter)
        d = tmp_path / f"src{i}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(os.urandom(4096) + f"#{i}".encode())
        cfg = {"r": 8, "lora_alpha": 16, "target_modules": ["to_q", "to_v"], "base_model_name_or_path": BASE}
        (d / "adapter_config.json").write_text(json.dumps(cfg if config is None else config))
        for rel, data in (extra or {}).items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        return d

    return make


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remote(reg: AdapterRegistry, *parts: str) -> str:
    return "/".join((reg.root, *parts))


def plant(reg: AdapterRegistry, data: bytes, *parts: str) -> None:
    """Write raw bytes into the registry's storage, bypassing the registry."""
    path = remote(reg, *parts)
    reg.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # no-op on S3
    reg.fs.pipe_file(path, data)


# --------------------------------------------------------------------------- publish / resolve / list / delete


def test_publish_resolve_latest_and_pinned(reg: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    src1 = make_adapter(extra={"samples/preview.png": b"png", ".DS_Store": b"junk", "manifest.json": b"{}"})
    m1 = reg.publish("acme", "style", src1, trigger_words=["sks"], metrics={"clip": 0.3}, dataset_hash="d1")
    assert (m1.tenant, m1.name, m1.version, m1.ref) == ("acme", "style", 1, "acme/style@v1")
    # Checksums of every published file; dot-files and a stale manifest are not published.
    assert m1.files == {
        "adapter_config.json": sha(src1 / "adapter_config.json"),
        "adapter_model.safetensors": sha(src1 / "adapter_model.safetensors"),
        "samples/preview.png": hashlib.sha256(b"png").hexdigest(),
    }
    # Defaults come from the peft adapter_config.json.
    assert (m1.base_model_id, m1.rank, m1.alpha, m1.target_modules) == (BASE, 8, 16.0, ["to_q", "to_v"])
    assert m1.visibility == "private" and m1.created_at.tzinfo == timezone.utc
    assert m1.trigger_words == ["sks"] and m1.metrics == {"clip": 0.3}

    m2 = reg.publish("acme", "style", make_adapter(), base_model_id="other/base", base_fingerprint="fp", visibility="public")
    assert m2.version == 2 and m2.base_model_id == "other/base" and m2.visibility == "public"

    assert reg.resolve("acme/style") == m2
    assert reg.resolve("acme/style@v1") == m1
    assert reg.resolve("acme/style@1") == m1
    assert reg.resolve(AdapterRef("acme", "style", 2)) == m2
    assert reg.versions("acme/style") == [1, 2]
    # The stored manifest round-trips exactly (ISO UTC timestamp included).
    raw = json.loads(reg.fs.cat_file(remote(reg, "acme", "style", "v1", "manifest.json")))
    assert raw["created_at"].endswith("Z") and AdapterManifest.model_validate(raw) == m1


def test_list_filters_and_sorts(reg: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    assert reg.manifests() == []
    src = make_adapter()
    for tenant, name in [("acme", "b"), ("acme", "a"), ("acme", "a"), ("acme2", "a"), ("zeta", "x")]:
        reg.publish(tenant, name, src)
    assert [m.ref for m in reg.manifests()] == ["acme/a@v1", "acme/a@v2", "acme/b@v1", "acme2/a@v1", "zeta/x@v1"]
    # "acme" must not match the "acme2" prefix on S3.
    assert [m.ref for m in reg.manifests("acme")] == ["acme/a@v1", "acme/a@v2", "acme/b@v1"]
    assert [m.ref for m in reg.manifests("acme", latest_only=True)] == ["acme/a@v2", "acme/b@v1"]
    assert reg.manifests("nobody") == []


def test_unknown_refs_raise_not_found(reg: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    with pytest.raises(AdapterNotFound) as exc:
        reg.resolve("acme/missing")
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, LookupError)
    assert "acme/missing" in str(exc.value)
    reg.publish("acme", "style", make_adapter())
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme/style@v2")
    with pytest.raises(AdapterNotFound):
        reg.fetch("acme/style@v7")
    with pytest.raises(AdapterNotFound):
        reg.delete("acme/style@v2")


def test_delete_version_then_all(reg: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    for _ in range(3):
        reg.publish("acme", "style", make_adapter())
    reg.publish("acme", "other", make_adapter())

    assert reg.delete("acme/style@v3") == ["acme/style@v3"]
    assert reg.resolve("acme/style").version == 2
    assert not reg.fs.exists(remote(reg, "acme", "style", "v3", "adapter_model.safetensors"))

    assert reg.delete("acme/style") == ["acme/style@v1", "acme/style@v2"]
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme/style")
    with pytest.raises(AdapterNotFound):
        reg.delete("acme/style")
    assert [m.ref for m in reg.manifests()] == ["acme/other@v1"]  # neighbours untouched


# --------------------------------------------------------------------------- immutability and races


def test_versions_are_immutable(reg: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    src = make_adapter()
    m1 = reg.publish("acme", "style", src)
    with pytest.raises(AdapterExists):
        reg.publish("acme", "style", make_adapter(), version=1)
    with pytest.raises(AdapterExists):
        reg.publish("acme", "style", make_adapter(), version="v1")
    # The exclusive write itself (If-None-Match on S3, link() locally) refuses too.
    with pytest.raises(FileExistsError):
        reg._write_exclusive(remote(reg, "acme", "style", "v1", "manifest.json"), b"{}")
    assert reg.resolve("acme/style@v1") == m1
    _, path = reg.fetch("acme/style@v1")
    assert sha(path / "adapter_model.safetensors") == sha(src / "adapter_model.safetensors")
    # Pinning a fresh number works (mirroring between registries).
    assert reg.publish("acme", "style", make_adapter(), version=5).version == 5
    assert reg.publish("acme", "style", make_adapter()).version == 6


def test_stale_listing_cannot_overwrite_committed_version(
    reg: AdapterRegistry, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publisher that listed before v1 was committed must not write into v1."""
    src1 = make_adapter()
    reg.publish("acme", "style", src1)
    real = reg._version_numbers
    calls = {"n": 0}

    def stale_once(tenant: str, name: str) -> list[int]:
        calls["n"] += 1
        return [] if calls["n"] == 1 else real(tenant, name)

    monkeypatch.setattr(reg, "_version_numbers", stale_once)
    assert reg.publish("acme", "style", make_adapter()).version == 2  # lost the claim on v1, retried
    monkeypatch.undo()
    _, path = reg.fetch("acme/style@v1")
    assert sha(path / "adapter_model.safetensors") == sha(src1 / "adapter_model.safetensors")


# --------------------------------------------------------------------------- fetch and checksums


def test_fetch_caches_and_verifies(
    reg: AdapterRegistry, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = make_adapter(extra={"samples/a.txt": b"a"})
    m = reg.publish("acme", "style", src)
    downloads: list[str] = []
    real_get = reg.fs.get_file
    monkeypatch.setattr(reg.fs, "get_file", lambda rpath, lpath, **kw: (downloads.append(rpath), real_get(rpath, lpath, **kw))[1])

    m1, path = reg.fetch("acme/style")
    assert m1 == m and path == reg.cache_path(m)
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        LOCK_FILENAME, "adapter_config.json", "adapter_model.safetensors", "manifest.json", "samples/a.txt"
    ]
    assert AdapterManifest.model_validate_json((path / "manifest.json").read_bytes()) == m
    assert len(downloads) == 3

    reg.fetch("acme/style@v1")
    assert len(downloads) == 3  # cached and verified: nothing downloaded

    (path / "adapter_model.safetensors").write_bytes(b"bit rot")
    reg.fetch("acme/style")
    assert len(downloads) == 4 and downloads[-1].endswith("adapter_model.safetensors")  # healed, only that file
    assert sha(path / "adapter_model.safetensors") == m.files["adapter_model.safetensors"]

    dest = tmp_path / "explicit"
    dest.mkdir()
    (dest / "unrelated.txt").write_text("keep me")
    _, got = reg.fetch("acme/style", dest)
    assert got == dest and (dest / "unrelated.txt").read_text() == "keep me"
    assert sha(dest / "adapter_model.safetensors") == m.files["adapter_model.safetensors"]


def test_checksum_mismatch_is_reported(reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path) -> None:
    reg.publish("acme", "style", make_adapter())
    plant(reg, b"tampered", "acme", "style", "v1", "adapter_model.safetensors")
    dest = tmp_path / "dest"
    with pytest.raises(AdapterCorrupt, match="checksum mismatch for 'adapter_model.safetensors'"):
        reg.fetch("acme/style", dest)
    # Neither the bad file nor a partial download is left where a loader would find it.
    assert not (dest / "adapter_model.safetensors").exists()
    assert not [p for p in dest.iterdir() if ".part-" in p.name]
    # A file the manifest lists but storage lost is corruption too.
    reg.fs.rm_file(remote(reg, "acme", "style", "v1", "adapter_model.safetensors"))
    with pytest.raises(AdapterCorrupt, match="missing"):
        reg.fetch("acme/style", dest)


def test_planted_manifests_are_rejected(reg: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    """A manifest whose file keys traverse, or that sits under another id, is never served."""
    m = reg.publish("acme", "style", make_adapter())
    evil = m.model_dump(mode="json") | {"files": {"../../escape.sh": "0" * 64}}
    plant(reg, json.dumps(evil).encode(), "acme", "style", "v2", "manifest.json")
    moved = m.model_dump(mode="json")  # says acme/style@v1, stored as other/style@v1
    plant(reg, json.dumps(moved).encode(), "other", "style", "v1", "manifest.json")

    with pytest.raises(AdapterCorrupt):
        reg.resolve("acme/style@v2")
    with pytest.raises(AdapterCorrupt, match="claims to be acme/style@v1"):
        reg.resolve("other/style@v1")
    assert reg.resolve("acme/style") == m  # latest skips the corrupt v2
    assert [x.ref for x in reg.manifests()] == ["acme/style@v1"]


def test_check_compatible() -> None:
    m = AdapterManifest(tenant="acme", name="s", version=1, base_model_id=BASE, base_fingerprint="abc")
    check_compatible(m, BASE, "abc")
    check_compatible(m, BASE, None)  # caller cannot fingerprint: id match suffices
    with pytest.raises(AdapterIncompatible, match="trained for base model"):
        check_compatible(m, "other/model", "abc")
    with pytest.raises(AdapterIncompatible, match="fingerprint"):
        check_compatible(m, BASE, "def")
    with pytest.raises(AdapterIncompatible):
        check_compatible(m.model_copy(update={"base_fingerprint": ""}), BASE, "abc", require_fingerprint=True)
    assert AdapterRegistry.check_compatible is check_compatible


def test_fetch_checks_compatibility_before_download(
    local_reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    local_reg.publish("acme", "style", make_adapter(), base_fingerprint="fp1")
    with pytest.raises(AdapterIncompatible):
        local_reg.fetch("acme/style", tmp_path / "d", base_model_id=BASE, base_fingerprint="fp2")
    assert not (tmp_path / "d").exists()
    m, _ = local_reg.fetch("acme/style", tmp_path / "d", base_model_id=BASE, base_fingerprint="fp1")
    assert m.base_fingerprint == "fp1"


# --------------------------------------------------------------------------- atomicity


def test_publish_failing_before_manifest_is_invisible(
    reg: AdapterRegistry, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    m1 = reg.publish("acme", "style", make_adapter())
    real = reg._write_exclusive

    def crash_on_manifest(path: str, data: bytes) -> None:
        if path.endswith("/manifest.json"):
            raise KeyboardInterrupt("killed before commit")
        real(path, data)

    monkeypatch.setattr(reg, "_write_exclusive", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        reg.publish("acme", "style", make_adapter())
    monkeypatch.undo()

    assert reg.fs.exists(remote(reg, "acme", "style", "v2", "adapter_model.safetensors"))  # files did land
    assert reg.resolve("acme/style") == m1
    assert [m.ref for m in reg.manifests()] == ["acme/style@v1"]
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme/style@v2")
    # The orphan's number is never reused; gc removes it only once it is old enough.
    assert reg.publish("acme", "style", make_adapter()).version == 3
    assert reg.gc_incomplete(older_than_s=3600) == []
    assert reg.gc_incomplete(older_than_s=0) == ["acme/style@v2"]
    assert not reg.fs.exists(remote(reg, "acme", "style", "v2", "adapter_model.safetensors"))
    assert [m.version for m in reg.manifests()] == [1, 3]


KILLED_PUBLISHER = r"""
import json, os, sys, time
from lightray.registry import AdapterRegistry
opts = json.loads(os.environ.get("LIGHTRAY_REGISTRY_STORAGE_OPTIONS") or "null")
reg = AdapterRegistry(os.environ["LIGHTRAY_REGISTRY"], opts)
real = reg._write_exclusive
def pause_before_commit(path, data):
    if path.endswith("/manifest.json"):
        print("UPLOADED", flush=True)
        time.sleep(120)
    real(path, data)
reg._write_exclusive = pause_before_commit
reg.publish("acme", "style", sys.argv[1])
"""


def test_publish_killed_mid_way_leaves_nothing_visible(
    backend: Backend, reg: AdapterRegistry, make_adapter: MakeAdapter
) -> None:
    """SIGKILL a real publisher process after its uploads, before its manifest."""
    m1 = reg.publish("acme", "style", make_adapter())
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISHER, str(make_adapter())],
        env=backend.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        assert line.strip() == "UPLOADED", proc.stderr.read() if proc.poll() is not None else line  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]

    assert reg.fs.exists(remote(reg, "acme", "style", "v2", CLAIM_FILENAME))
    assert reg.resolve("acme/style") == m1
    assert [m.ref for m in reg.manifests()] == ["acme/style@v1"]
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme/style@v2")


def test_delete_removes_manifest_first(
    reg: AdapterRegistry, make_adapter: MakeAdapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.publish("acme", "style", make_adapter())
    m2 = reg.publish("acme", "style", make_adapter())

    def crash(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(reg.fs, "rm", crash)  # manifest gone (rm_file), payload removal dies
    with pytest.raises(KeyboardInterrupt):
        reg.delete("acme/style@v1")
    monkeypatch.undo()
    assert [m.ref for m in reg.manifests()] == [m2.ref]
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme/style@v1")
    assert reg.gc_incomplete(older_than_s=0) == ["acme/style@v1"]


# --------------------------------------------------------------------------- validation


BAD_REFS = [
    "",
    "acme",
    "../x",
    "acme/..",
    "a/../../b",
    "/etc/passwd",
    "//x",
    "acme/x/y",
    "acme\\x/y",
    "acme/x\\..\\..",
    "acme/.hidden",
    "acme/x..y",
    "ACME/x",
    "acme/x y",
    "acme/x\n",
    "acme\n/x",
    "acme/x\x00",
    "acme/ｘ",  # fullwidth x
    "acme/x\u200b",  # zero-width space
    "acme/x\u0301",  # combining accent
    "acme/x@",
    "acme/x@v",
    "acme/x@v0",
    "acme/x@0",
    "acme/x@v03",
    "acme/x@v-1",
    "acme/x@v1.0",
    "acme/x@v٣",  # arabic-indic digit three
    "acme/x@v1@v2",
    "acme/x@v1/../..",
    "acme/x@latest",
    "s3://bucket/x",
    "file:///etc/x",
    "a" * 64 + "/x",
    "acme/" + "b" * 64,
]


@pytest.mark.parametrize("ref", BAD_REFS)
def test_invalid_refs_are_rejected(ref: str) -> None:
    with pytest.raises(InvalidAdapterRef):
        AdapterRef.parse(ref)


def test_invalid_ids_never_touch_storage(local_reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path) -> None:
    src = make_adapter()
    for ref in BAD_REFS:
        for call in (local_reg.resolve, local_reg.fetch, local_reg.delete):
            with pytest.raises(InvalidAdapterRef):
                call(ref)
    for tenant, name in [("..", "x"), ("acme", ".."), ("a/b", "x"), ("acme", "x/../../y"), ("/abs", "x"), ("acme", "")]:
        with pytest.raises(InvalidAdapterRef):
            local_reg.publish(tenant, name, src)
    with pytest.raises(InvalidAdapterRef):
        local_reg.manifests("../..")
    with pytest.raises(InvalidAdapterRef):
        local_reg.publish("acme", "x", src, version=0)
    assert isinstance(InvalidAdapterRef("x"), ValueError)
    assert not (tmp_path / "registry").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src0"]


@pytest.mark.parametrize("ref,expected", [
    ("acme/x", AdapterRef("acme", "x", None)),
    ("acme/x@v3", AdapterRef("acme", "x", 3)),
    ("acme/x@12", AdapterRef("acme", "x", 12)),
    ("a-b_c.d/x-1.2_3", AdapterRef("a-b_c.d", "x-1.2_3", None)),
    ("0/" + "z" * 63, AdapterRef("0", "z" * 63, None)),
])
def test_valid_refs_parse(ref: str, expected: AdapterRef) -> None:
    assert AdapterRef.parse(ref) == expected
    assert AdapterRef.parse(str(expected)) == expected


def test_manifest_rejects_traversing_file_keys() -> None:
    for key in ["../x", "/abs", "a/../../b", "a\\b", ".claim.json", "manifest.json", "a//b", ""]:
        with pytest.raises(ValidationError):
            AdapterManifest(tenant="acme", name="s", version=1, base_model_id=BASE, files={key: "0" * 64})


def test_publish_validates_before_writing(local_reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path) -> None:
    src = make_adapter()
    with pytest.raises(TypeError, match="version_note"):
        local_reg.publish("acme", "s", src, version_note="x")
    with pytest.raises(TypeError, match="files"):
        local_reg.publish("acme", "s", src, files={})
    with pytest.raises(ValueError, match="base_model_id"):
        local_reg.publish("acme", "s", make_adapter(config={"r": 4}))  # no base anywhere
    with pytest.raises(ValueError, match="visibility"):
        local_reg.publish("acme", "s", src, visibility="world")
    (src / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="adapter_config.json"):
        local_reg.publish("acme", "s", src)
    with pytest.raises(FileNotFoundError):
        local_reg.publish("acme", "s", tmp_path / "nope")
    assert not (tmp_path / "registry").exists()  # nothing claimed by failed validation


# --------------------------------------------------------------------------- CLI


def run_cli(backend: Backend, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = backend.env() | {"LIGHTRAY_ADAPTER_CACHE": str(tmp_path / "cli-cache")}
    return subprocess.run(
        [sys.executable, "-m", "lightray.adapters_cli", "adapters", *args],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )


def test_cli_round_trip_subprocess(backend: Backend, reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path) -> None:
    src = make_adapter()
    r = run_cli(backend, tmp_path, "push", "acme/style", str(src), "--base-model-id", BASE,
                "--base-family", "qwen-image-2.1", "--trigger-word", "sks", "--trigger-word", "ohwx", "--public",
                "--json")
    assert r.returncode == 0, r.stderr
    pushed = json.loads(r.stdout)
    assert pushed["ref"] == "acme/style@v1" and pushed["visibility"] == "public"
    assert pushed["base_family"] == "qwen-image-2.1"
    assert pushed["trigger_words"] == ["sks", "ohwx"]
    assert reg.resolve("acme/style").files == pushed["files"]  # visible to another process

    r = run_cli(backend, tmp_path, "list", "--tenant", "acme")
    assert r.returncode == 0 and "acme/style@v1" in r.stdout and "public" in r.stdout, r.stderr

    r = run_cli(backend, tmp_path, "delete", "acme/style")
    assert r.returncode == 0 and "deleted acme/style@v1" in r.stdout, r.stderr
    assert reg.manifests() == []

    r = run_cli(backend, tmp_path, "show", "../etc")
    assert r.returncode == 1 and r.stderr.startswith("error: invalid adapter ref")


def test_cli_in_process(
    local_reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIGHTRAY_REGISTRY", local_reg.root_url)
    monkeypatch.setenv("LIGHTRAY_ADAPTER_CACHE", str(tmp_path / "cli-cache"))
    main = adapters_cli.main

    def out(*argv: str) -> str:
        capsys.readouterr()
        assert main(["adapters", *argv]) == 0
        return capsys.readouterr().out

    assert out("list") == "no adapters\n"
    assert out("push", "acme/style", str(make_adapter())).startswith("published acme/style@v1")
    assert json.loads(out("push", "acme/style", str(make_adapter()), "--json", "--metrics", '{"fid": 12.5}'))["metrics"] == {"fid": 12.5}
    assert [m["ref"] for m in json.loads(out("list", "--json"))] == ["acme/style@v1", "acme/style@v2"]
    assert [m["ref"] for m in json.loads(out("list", "--json", "--latest"))] == ["acme/style@v2"]
    assert json.loads(out("show", "acme/style@1"))["version"] == 1
    fetched = Path(out("fetch", "acme/style", "--dest", str(tmp_path / "f")).strip())
    assert (fetched / "manifest.json").is_file()
    assert json.loads(out("gc", "--older-than", "0", "--json")) == {"removed": []}
    # --registry on the leaf command overrides the environment.
    assert out("list", "--registry", str(tmp_path / "elsewhere")) == "no adapters\n"

    capsys.readouterr()
    assert main(["adapters", "show", "acme/nope"]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["adapters", "push", "acme/style@v1", str(make_adapter())]) == 1
    assert "immutable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["adapters"])
    assert exc.value.code == 2


def test_s3_server_fixture_smoke(s3_server: Any) -> None:
    """The helper starts a signed-request S3 endpoint with a ready bucket."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    assert fs.ls(s3_server.bucket, refresh=True) is not None
    bad = {**s3_server.storage_options, "secret": "wrong"}
    with pytest.raises(PermissionError):
        s3fs.S3FileSystem(**bad).ls(s3_server.bucket, refresh=True)
    assert s3_server.process.poll() is None


# --------------------------------------------------------------------------- manifest cache


def test_resolve_caches_manifests_and_its_own_writes_take_effect_at_once(
    local_reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    from lightray.registry import ManifestCache

    cached = AdapterRegistry(local_reg.root_url, cache_dir=tmp_path / "cache",
                             manifest_cache=ManifestCache(ttl_s=60))
    v1 = cached.publish("acme", "style", make_adapter())
    assert cached.resolve("acme/style") == v1
    # Another process's publish is seen once the latest TTL has passed (here: not within the test).
    v2 = local_reg.publish("acme", "style", make_adapter())
    assert cached.resolve("acme/style") == v1
    assert local_reg.resolve("acme/style") == v2  # no manifest cache: reads the store every time
    # This object's own publish moves latest at once.
    v3 = cached.publish("acme", "style", make_adapter())
    assert cached.resolve("acme/style") == v3
    # A pinned version is cached for the same TTL (here: the whole test).
    assert cached.resolve("acme/style@v2") == v2
    local_reg.delete("acme/style@v2")
    assert cached.resolve("acme/style@v2") == v2
    # This object's own delete forgets the version and latest at once.
    cached.delete("acme/style@v3")
    assert cached.resolve("acme/style") == v1
    with pytest.raises(AdapterNotFound):
        cached.resolve("acme/style@v3")


def test_a_zero_latest_ttl_sees_other_publishers_at_once(
    local_reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    from lightray.registry import ManifestCache

    cached = AdapterRegistry(local_reg.root_url, cache_dir=tmp_path / "cache",
                             manifest_cache=ManifestCache(ttl_s=0))
    local_reg.publish("acme", "style", make_adapter())
    assert cached.resolve("acme/style").version == 1
    local_reg.publish("acme", "style", make_adapter())
    assert cached.resolve("acme/style").version == 2


# --------------------------------------------------------------------------- issue 30: versions, caches


def test_a_deleted_version_number_is_never_reused(reg: AdapterRegistry, make_adapter: MakeAdapter) -> None:
    """Finding 4: after a delete the next version is a new number, so `acme/style@v3` never names other weights."""
    for _ in range(3):
        reg.publish("acme", "style", make_adapter())
    v3 = reg.resolve("acme/style@v3")
    reg.delete("acme/style@v3")
    assert reg.publish("acme", "style", make_adapter()).version == 4
    assert reg.fs.exists(remote(reg, "acme", "style", "v3", TOMBSTONE_FILENAME))
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme/style@v3")
    with pytest.raises(AdapterExists):  # not even when asked for by number
        reg.publish("acme", "style", make_adapter(), version=3)
    # Deleting the whole adapter keeps every number, and gc does not free them.
    assert reg.delete("acme/style") == ["acme/style@v1", "acme/style@v2", "acme/style@v4"]
    assert reg.gc_incomplete(older_than_s=0) == []
    assert reg.publish("acme", "style", make_adapter()).version == 5
    assert [m.ref for m in reg.manifests()] == ["acme/style@v5"]
    assert reg.resolve("acme/style").checksum != v3.checksum


def test_every_answer_is_cached_alike_and_a_delete_elsewhere_is_seen_within_the_ttl(
    local_reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 7: an absent ref is answered from the cache like a present one (no store read that tells them
    apart); finding 4: a pinned version deleted through another registry object is refused once the TTL passes."""
    from lightray.registry import ManifestCache

    clock = [1000.0]
    monkeypatch.setattr("lightray.registry.time.monotonic", lambda: clock[0])
    local_reg.publish("acme", "style", make_adapter())
    cached = AdapterRegistry(local_reg.root_url, cache_dir=tmp_path / "cache",
                             manifest_cache=ManifestCache(ttl_s=2.0))
    reads: list[str] = []
    for method in ("cat_file", "ls"):
        real = getattr(cached.fs, method)
        monkeypatch.setattr(cached.fs, method, lambda path, *a, _real=real, **k: (reads.append(path), _real(path, *a, **k))[1])

    def store_reads(ref: str) -> int:
        before = len(reads)
        try:
            cached.resolve(ref)
        except AdapterNotFound:
            pass
        return len(reads) - before

    for present, absent in [("acme/style@v1", "acme/style@v9"), ("acme/style", "acme/nothing")]:
        assert store_reads(present) > 0 and store_reads(absent) > 0
        assert store_reads(present) == store_reads(absent) == 0  # both from memory
    local_reg.delete("acme/style@v1")  # another process
    assert cached.resolve("acme/style@v1").version == 1  # within the TTL
    clock[0] += 2.0
    with pytest.raises(AdapterNotFound):
        cached.resolve("acme/style@v1")
    with pytest.raises(AdapterNotFound):
        cached.resolve("acme/style")


def test_the_file_cache_is_bounded_and_evicts_the_least_recently_used_files_not_in_use(
    local_reg: AdapterRegistry, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    """Finding 8: files of adapters nobody uses leave the disk once the cache is past its bound, oldest first;
    files in use stay. The cache folder is named by the manifest's checksum, not the ref alone."""
    for name in ("a", "b", "c"):
        local_reg.publish("acme", name, make_adapter())
    one = sum(f.stat().st_size for f in local_reg.fetch("acme/a", tmp_path / "probe")[1].iterdir())
    reg = AdapterRegistry(local_reg.root_url, cache_dir=tmp_path / "cache", cache_max_bytes=2 * one + one // 2)

    def cached() -> list[str]:
        return sorted(folder.parent.name for _, _, folder in reg.file_cache.entries())

    m_a, held_a = reg.checkout("acme/a")
    assert held_a.path == reg.cache_path(m_a) and held_a.path.name == f"v1-{m_a.checksum[:16]}"
    reg.fetch("acme/b")
    assert cached() == ["a", "b"]
    reg.fetch("acme/c")  # over the bound: a is the oldest, but in use; b goes
    assert cached() == ["a", "c"]
    assert (held_a.path / "adapter_model.safetensors").is_file()
    held_a.release()
    reg.fetch("acme/b")  # a, no longer in use, is now the least recently used
    assert cached() == ["b", "c"]
    unbounded = AdapterRegistry(local_reg.root_url, cache_dir=tmp_path / "cache")
    unbounded.fetch("acme/a")
    assert len(unbounded.file_cache.entries()) == 3

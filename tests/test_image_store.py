"""The image store keeps file I/O off the caller's thread (the ingress's event loop) and expires on a timer."""

from __future__ import annotations

import os
import threading
import time

from serve_app.image_store import ImageStore


def test_put_writes_on_the_stores_thread_and_get_sees_it_at_once(tmp_path, monkeypatch):
    store = ImageStore(str(tmp_path / "images"))
    writers: list[str] = []
    write = store._write
    monkeypatch.setattr(store, "_write", lambda path, png: (writers.append(threading.current_thread().name),
                                                            write(path, png))[1])
    names = [store.put(b"png %d" % i) for i in range(3)]
    assert [store.get(name) for name in names] == [b"png 0", b"png 1", b"png 2"]
    assert writers and threading.current_thread().name not in writers
    assert store.get("not-a-name.png") is None
    store.close()


def test_a_failed_write_reads_as_missing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    store = ImageStore(str(blocker / "images"))
    assert store.get(store.put(b"png")) is None
    store.close()


def unswept(root, max_files: int) -> ImageStore:
    """A store whose timer never sweeps (its first sweep would race the writes a test is making): tests call
    `sweep` themselves."""
    store = ImageStore(str(root), ttl_s=3600, max_files=max_files)
    store._sweep_periodically = lambda: None
    return store


def put_aged(store: ImageStore, tenant: str | None, ages_s: list[float]) -> list[str]:
    """Store one image per age (seconds before now) as `tenant`'s, each written and dated that long ago."""
    names = [store.put(b"%d" % i, tenant=tenant) for i in range(len(ages_s))]
    assert all(store.get(name) for name in names)
    folder = store.root if tenant is None else store.root / "tenants" / tenant
    for name, age in zip(names, ages_s):
        os.utime(folder / name, (time.time() - age, time.time() - age))
    return names


def test_sweep_expires_by_age_then_by_count(tmp_path):
    store = unswept(tmp_path, max_files=2)
    names = put_aged(store, None, [7200, 99, 98, 97])
    store.sweep()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(names[2:])
    store.close()


def test_one_tenants_burst_evicts_its_own_images_before_another_tenants(tmp_path):
    """The store holds 6; tenant `calm` has 2 older images, then `burst` stores 10. The sweep evicts the burst's
    oldest (it holds the most) and keeps every one of calm's, which a global oldest-first eviction deleted first."""
    store = unswept(tmp_path, max_files=6)
    calm = put_aged(store, "calm", [500, 400])
    burst = put_aged(store, "burst", [300 - i for i in range(10)])
    local = put_aged(store, None, [600])  # auth off's single user is one more tenant
    store.sweep()
    assert all(store.get(name) for name in calm + local)
    assert [name for name in burst if store.get(name)] == burst[-3:]  # its 3 newest: 6 files in all
    # Past their TTL, calm's images go like anyone's.
    put_aged(store, "calm", [7200])
    store.sweep()
    assert sum(1 for _ in tmp_path.rglob("*.png")) == 6
    # When every tenant holds as many, the oldest file goes first.
    even = unswept(tmp_path / "even", max_files=3)
    a, b = put_aged(even, "a", [50, 10]), put_aged(even, "b", [40, 20])
    even.sweep()
    assert [bool(even.get(name)) for name in a + b] == [False, True, True, True]
    store.close()
    even.close()


def test_the_timer_sweeps_without_any_write(tmp_path):
    store = ImageStore(str(tmp_path), ttl_s=0.0, sweep_interval_s=0.05)
    name = store.put(b"png")
    deadline = time.time() + 10
    while (tmp_path / name).exists() or store.get(name) is not None:
        assert time.time() < deadline, "the sweeper never ran"
        time.sleep(0.05)
    store.close()


def test_the_apps_store_takes_its_bounds_from_the_settings(preset, tmp_path):
    """`image_store_max_files` and `image_store_sweep_interval_s` (Serve YAML args) reach the ingress's store, so a
    deployment (benchmarks/hostile.py) can bound it small enough for a burst to pass it."""
    from recording_backend import RecordingBackend
    from serve_app.api import create_app
    from serve_app.settings import ServiceSettings

    settings = ServiceSettings(preset=preset.model_dump(), auth_enabled=False, registry=str(tmp_path / "registry"),
                               image_store_dir=str(tmp_path / "images"), image_store_max_files=3,
                               image_store_sweep_interval_s=0.5)
    store = create_app(RecordingBackend(preset), settings).state.image_store
    assert (store.max_files, store.sweep_interval_s) == (3, 0.5)
    defaults = ServiceSettings.model_fields
    assert (defaults["image_store_max_files"].default, defaults["image_store_sweep_interval_s"].default) == (2000, 60.0)

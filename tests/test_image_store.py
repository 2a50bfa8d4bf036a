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
    monkeypatch.setattr(store, "_write", lambda name, png: (writers.append(threading.current_thread().name),
                                                            write(name, png))[1])
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


def test_sweep_expires_by_age_then_by_count(tmp_path):
    store = ImageStore(str(tmp_path), ttl_s=3600, max_files=2)
    names = [store.put(b"%d" % i) for i in range(4)]
    assert all(store.get(name) for name in names)
    old = time.time() - 7200
    os.utime(tmp_path / names[0], (old, old))
    for i, name in enumerate(names[1:], start=1):
        os.utime(tmp_path / name, (time.time() - 100 + i, time.time() - 100 + i))
    store.sweep()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(names[2:])
    store.close()


def test_the_timer_sweeps_without_any_write(tmp_path):
    store = ImageStore(str(tmp_path), ttl_s=0.0, sweep_interval_s=0.05)
    name = store.put(b"png")
    deadline = time.time() + 10
    while (tmp_path / name).exists() or store.get(name) is not None:
        assert time.time() < deadline, "the sweeper never ran"
        time.sleep(0.05)
    store.close()

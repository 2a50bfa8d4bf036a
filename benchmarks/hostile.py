"""Hostile traffic against a live service (issue 30, "Measure"): every reproducer of issue 30's findings and a
bounded fuzz, sent while an innocent tenant keeps generating, once with auth on and once with auth off.

    python benchmarks/hostile.py                       # a private local Ray cluster, both phases (≈ 10 min, 2 cores)
    python benchmarks/hostile.py --phases on           # one phase
    python benchmarks/hostile.py --url http://127.0.0.1:8000 --phases off --registry ./registry
    python benchmarks/hostile.py --print-keys          # LIGHTRAY_API_KEYS for a service checked with --url, auth on

The local cluster serves configs/serve/local.yaml with `BENCH_ARGS` (a private registry and image store, an image
store of `max_files: 8` swept every second so that one tenant's `url` burst passes it, a request pixel budget of
2048² so that a 4096² upload crosses it) and one Denoiser replica (autoscaling off: a replica that goes away is a
restart). Auth on adds `KEYS`: tenant `calm` (the innocent one, interactive), tenant `rowdy` (interactive, at most
4 requests in progress) and a `batch` key of `rowdy`. A service given with `--url` must be configured alike
(`--print-keys`, `BENCH_ARGS`; `--registry`: the folder its `registry` arg names); replica restarts and the
ingress's RSS are measured only on the local cluster.

Two threads of the innocent tenant send Lightning-4 64x64 generations throughout: `--quiet-s` seconds alone (their
p50 without hostile traffic), then during the cases (their p50 with it). Every row of the printed table must be as
expected. Writes benchmarks/results/hostile.json; docs/hostile.md has the tables.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import http.client
import json
import select
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from fuzz_api import fuzz  # noqa: E402
from lightray.config import load_preset  # noqa: E402
from lightray.registry_settings import open_registry  # noqa: E402
from memory_soak import MiB, replica_rss  # noqa: E402
from testing.adapters import publish_placeholder_adapter  # noqa: E402
from testing.images import encoded, header_only_png, png16  # noqa: E402
from testing.local_cluster import RayCluster  # noqa: E402

MODEL = "lightray-shapes-lightning-4"
INNOCENT_BODY = {"prompt": "a red circle on the left, white background", "model": MODEL, "size": "64x64"}
CALM, ROWDY = "calm", "rowdy"
KEYS = [
    {"tenant": CALM, "key": "sk-calm-0123456789abcdef"},
    {"tenant": ROWDY, "key": "sk-rowdy-0123456789abcdef", "max_concurrent_requests": 4},
    {"tenant": ROWDY, "key": "sk-rowdy-batch-0123456789abcdef", "priority": "batch"},
]
ROWDY_BOUND = 4
BENCH_ARGS = {"image_store_max_files": 8, "image_store_sweep_interval_s": 1.0,
              "max_request_image_pixels": 2048 * 2048}
ONE_DENOISER = {"Denoiser": {"num_replicas": 1, "autoscaling_config": None}}


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


class Keys:
    """Who sends what: with auth off, every role is the single local user (no key)."""

    def __init__(self, auth: bool):
        self.auth = auth
        self.calm, self.rowdy, self.batch = (k["key"] if auth else None for k in KEYS)


def error_of(r: httpx.Response) -> dict:
    try:
        return r.json().get("error") or {}
    except (ValueError, AttributeError):
        return {}


def said(r: httpx.Response) -> str:
    e = error_of(r)
    return f"{r.status_code}" + (f" {e.get('param')}" if e.get("param") else "")


class Report:
    def __init__(self, phase: str):
        self.phase, self.rows = phase, []

    def row(self, case: str, expected: str, got: str, ok: bool) -> None:
        self.rows.append({"case": case, "expected": expected, "got": got, "ok": bool(ok)})
        print(f"  [{'ok' if ok else 'FAIL'}] {case}: expected {expected}; got {got}", flush=True)

    def status(self, case: str, r: httpx.Response, status: int, param: str | None = None,
               contains: str | None = None) -> None:
        """A row for one response: its status, and the error's `param` / message when given."""
        e = error_of(r)
        ok = r.status_code == status and (param is None or e.get("param") == param) and (
            contains is None or contains in (e.get("message") or ""))
        expected = f"{status}" + (f" naming `{param}`" if param else "") + (f" ('{contains}')" if contains else "")
        self.row(case, expected, said(r) + ("" if ok else f" {str(e.get('message', r.text))[:120]}"), ok)

    def na(self, case: str, why: str) -> None:
        self.rows.append({"case": case, "expected": why, "got": "n/a", "ok": None})
        print(f"  [n/a] {case}: {why}", flush=True)


# ------------------------------------------------------------------------------------------- the innocent load

class InnocentLoad:
    """`threads` loops of ordinary generations as the innocent tenant; each result is kept with the window it
    started in (`window`, set by the benchmark)."""

    def __init__(self, url: str, key: str | None, threads: int = 2):
        self.url, self.key, self.threads = url, key, threads
        self.window = "quiet"
        self.results: list[dict] = []
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)]

    def start(self) -> "InnocentLoad":
        for w in self._workers:
            w.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=300)

    def _loop(self, i: int) -> None:
        seed = 1000 * i
        with httpx.Client(timeout=300, headers=bearer(self.key)) as client:
            while not self._stop.is_set():
                seed += 1
                window, t0 = self.window, time.monotonic()
                try:
                    status = client.post(f"{self.url}/v1/images/generations",
                                         json={**INNOCENT_BODY, "seed": seed}).status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                self.results.append({"window": window, "status": status, "ms": (time.monotonic() - t0) * 1000})

    def statuses(self, window: str | None = None) -> dict[str, int]:
        return dict(collections.Counter(str(r["status"]) for r in self.results
                                        if window is None or r["window"] == window))

    def p50_ms(self, window: str) -> float | None:
        ms = [r["ms"] for r in self.results if r["window"] == window and r["status"] == 200]
        return round(statistics.median(ms), 1) if ms else None


# ----------------------------------------------------------------------------------------------- raw bodies

def raw_post(url: str, path: str, headers: dict[str, str], size: int, chunked: bool = False) -> dict:
    """POST a JSON body of `size` bytes (`{"prompt": "aaa…"}`), declared by Content-Length or sent chunked, a piece
    at a time, stopping as soon as the service answers (or stops reading): the status, the error, and how many
    body bytes had gone out when the answer came."""
    u = urllib.parse.urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nContent-Type: application/json\r\n"
                 f"{framing}\r\n{head}Connection: close\r\n\r\n".encode())
    opening, closing = b'{"prompt": "', b'"}'
    filler = size - len(opening) - len(closing)
    pieces = [opening, *(b"a" * min(64 * 1024, filler - i) for i in range(0, filler, 64 * 1024)), closing]
    sent = 0
    sock.settimeout(5)
    try:
        for data in pieces:
            if select.select([sock], [], [], 0)[0]:
                break  # an answer (or a close) before the body is all sent
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
            sent += len(data)
        else:
            if chunked:
                sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        pass  # the service stopped reading: its answer is waiting
    sock.settimeout(60)
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        body = response.read()
    except (ConnectionResetError, http.client.HTTPException) as err:
        return {"status": type(err).__name__, "sent": sent, "error": {}}
    finally:
        sock.close()
    try:
        error = json.loads(body).get("error") or {}
    except ValueError:
        error = {}
    return {"status": response.status, "sent": sent, "error": error}


# ------------------------------------------------------------------------------------------------- the cases

def readiness(rep: Report, url: str, probes: int = 300, concurrency: int = 24) -> list:
    with cf.ThreadPoolExecutor(concurrency) as pool, httpx.Client(timeout=60) as client:
        def probe(_):
            try:
                return client.get(f"{url}/readyz").status_code
            except httpx.HTTPError as err:
                return type(err).__name__
        statuses = list(pool.map(probe, range(probes)))
    counts = collections.Counter(map(str, statuses))
    rep.row(f"readiness: {probes} GET /readyz at concurrency {concurrency} during generations",
            f"{probes} × 200", ", ".join(f"{n} × {s}" for s, n in sorted(counts.items())), counts["200"] == probes)
    return statuses


def bodies(rep: Report, url: str, keys: Keys, client: httpx.Client) -> None:
    big = 30 * 1024 * 1024
    r = raw_post(url, "/v1/images/generations", {}, big)
    mib = f"after {r['sent'] / MiB:.1f} of 30 MiB sent"
    if keys.auth:
        rep.row("bodies: 30 MB JSON prompt without a key", "401 before the body is all sent",
                f"{r['status']} {r['error'].get('param')} {mib}", r["status"] == 401 and r["sent"] < big)
    else:
        rep.row("bodies: 30 MB JSON prompt (Content-Length)", "413 before the body is all sent",
                f"{r['status']} {r['error'].get('param')} {mib}", r["status"] == 413 and r["sent"] < big)
    r = raw_post(url, "/v1/images/generations", bearer(keys.rowdy), 4 * MiB, chunked=True)
    rep.row("bodies: chunked body of 4 MiB (bound 256 KiB)", "413 naming `request`",
            f"{r['status']} {r['error'].get('param')} after {r['sent'] / MiB:.2f} MiB sent",
            r["status"] == 413 and r["error"].get("param") == "request")
    rep.status("bodies: `seeds` of 10,000 entries (n=1)", client.post(
        f"{url}/v1/images/generations", headers=bearer(keys.rowdy),
        json={**INNOCENT_BODY, "seeds": list(range(10_000))}), 400, "seeds")
    rep.status("bodies: JSON edit nested 100,000 `[` deep", client.post(
        f"{url}/v1/images/edits", headers={**bearer(keys.rowdy), "Content-Type": "application/json"},
        content=b"[" * 100_000), 400, "request")


def adapters(rep: Report, url: str, keys: Keys, client: httpx.Client, registry_root: str, tmp: str) -> None:
    preset = load_preset("lightray-shapes")
    owner = CALM if keys.auth else "local"
    ttl = 2.5  # past the service's registry_cache_ttl_s (2 s)
    first = publish_placeholder_adapter(registry_root, preset, owner, "style", tmp)
    time.sleep(ttl)
    ref = first.ref
    if keys.auth:
        r = client.delete(f"{url}/v1/adapters/{owner}/style", params={"version": first.version},
                          headers=bearer(keys.calm))
        deleted = r.status_code == 200
        how = f"DELETE over HTTP {r.status_code}"
    else:  # no HTTP deletes with auth off: the local user deletes on the registry (`lightray adapters delete`)
        open_registry(registry_root).delete(ref)
        deleted, how = True, "deleted on the registry"
    again = publish_placeholder_adapter(registry_root, preset, owner, "style", tmp)
    rep.row("adapters: publish, delete the version, publish again", f"a new version (v{first.version + 1})",
            f"{ref}, {how}, then {again.ref}", deleted and again.version == first.version + 1)
    time.sleep(ttl)
    got = client.get(f"{url}/v1/adapters/{owner}/style", params={"version": first.version},
                     headers=bearer(keys.calm))
    gen = client.post(f"{url}/v1/images/generations", headers=bearer(keys.calm),
                      json={**INNOCENT_BODY, "lora": ref})
    rep.row(f"adapters: the deleted ref {ref} (GET, and as a generation's `lora`)", "404, 404 naming `lora`",
            f"{said(got)}, {said(gen)}", got.status_code == 404 and gen.status_code == 404
            and error_of(gen).get("param") == "lora")
    if keys.auth:
        private = client.get(f"{url}/v1/adapters/{CALM}/style", headers=bearer(keys.rowdy))
        absent = client.get(f"{url}/v1/adapters/{CALM}/no-such-style", headers=bearer(keys.rowdy))
        p_gen = client.post(f"{url}/v1/images/generations", headers=bearer(keys.rowdy),
                            json={**INNOCENT_BODY, "lora": f"{CALM}/style"})
        a_gen = client.post(f"{url}/v1/images/generations", headers=bearer(keys.rowdy),
                            json={**INNOCENT_BODY, "lora": f"{CALM}/no-such-style"})

        def shape(r: httpx.Response, name: str) -> tuple:
            e = error_of(r)
            return r.status_code, sorted(e), e.get("type"), e.get("code"), e.get("param"), \
                (e.get("message") or "").replace(name, "<name>")

        same = (shape(private, "style") == shape(absent, "no-such-style")
                and shape(p_gen, "style") == shape(a_gen, "no-such-style"))
        rep.row("adapters: another tenant's private ref vs an absent ref (GET, and as `lora`)",
                "the same status and body but for the name", f"{said(private)} / {said(absent)}, "
                f"{said(p_gen)} / {said(a_gen)}, {'same' if same else 'different'} bodies",
                same and private.status_code == 404)
    else:
        rep.na("adapters: another tenant's private ref vs an absent ref",
               "n/a with auth off (one user, every adapter usable): checked by tests/test_adapter_caches.py")
    for name in ("page-a", "page-b", "page-c"):
        publish_placeholder_adapter(registry_root, preset, owner, name, tmp)
    time.sleep(ttl)
    pages, after = [], None
    while len(pages) < 10:
        r = client.get(f"{url}/v1/adapters", headers=bearer(keys.calm),
                       params={"limit": 2, "tenant": owner, **({"after": after} if after else {})})
        if r.status_code != 200:
            pages.append(said(r))
            break
        page = r.json()
        pages.append([a["id"] for a in page["data"]])
        if not page["has_more"]:
            break
        after = page["last_id"]
    ids = [i for p in pages if isinstance(p, list) for i in p]
    want = sorted(f"{owner}/{n}@v1" for n in ("page-a", "page-b", "page-c")) + [again.ref]
    bad = client.get(f"{url}/v1/adapters", headers=bearer(keys.calm), params={"limit": 101})
    rep.row("adapters: GET /v1/adapters?limit=2, then after=last_id; limit=101",
            f"pages of 2 covering {len(want)} adapters once each; 400 naming `limit`",
            f"{pages}; {said(bad)}", sorted(ids) == sorted(want) and len(ids) == len(set(ids))
            and all(len(p) <= 2 for p in pages if isinstance(p, list)) and bad.status_code == 400
            and error_of(bad).get("param") == "limit")


def tenants(rep: Report, url: str, keys: Keys, client: httpx.Client, load: InnocentLoad) -> None:
    if not keys.auth:
        rep.na("tenants: a batch key asking for priority interactive",
               "n/a with auth off (no keys, any priority): checked by tests/test_tenants.py")
        rep.na("tenants: one tenant's flood → 429 for it, 200 for the others",
               "n/a with auth off (one tenant, no quota): checked by tests/test_admission.py")
        rep.na("adapters: GET /v1/adapters is admitted (a tenant at its bound gets 429)",
               "n/a with auth off: checked by tests/test_adapter_caches.py")
        return
    rep.status("tenants: the `batch` key asks for priority interactive", client.post(
        f"{url}/v1/images/generations", headers=bearer(keys.batch), json={**INNOCENT_BODY, "priority": "interactive"}),
        403, "priority")
    # The base model with true CFG, 30 steps, n=2 (seconds of engine work each), so the admitted requests hold
    # their slots while the others are refused and the listing below is sent.
    flood_body = {**INNOCENT_BODY, "model": "lightray-shapes", "size": "128x128", "n": 2}
    flood_n = 3 * ROWDY_BOUND
    load.window = "flood"
    with cf.ThreadPoolExecutor(flood_n) as pool, httpx.Client(timeout=300) as flood_client:
        futures = [pool.submit(flood_client.post, f"{url}/v1/images/generations", headers=bearer(keys.rowdy),
                               json={**flood_body, "seed": i}) for i in range(flood_n)]
        next(f for f in cf.as_completed(futures) if f.result().status_code == 429)  # rowdy is at its bound now
        listed_rowdy = client.get(f"{url}/v1/adapters", headers=bearer(keys.rowdy))
        listed_calm = client.get(f"{url}/v1/adapters", headers=bearer(keys.calm))
        flood = [f.result() for f in futures]
    load.window = "hostile"
    during = collections.Counter(str(r["status"]) for r in load.results if r["window"] == "flood")
    counts = collections.Counter(said(r) for r in flood)
    ok_flood = (counts.get("200", 0) >= 1 and counts.get("429 max_concurrent_requests", 0) >= 1
                and set(counts) <= {"200", "429 max_concurrent_requests"})
    rep.row(f"tenants: `rowdy` sends {flood_n} at once (its bound: {ROWDY_BOUND} in progress); `calm` keeps "
            "generating", "200s and 429s naming `max_concurrent_requests` for rowdy; only 200 for calm",
            f"rowdy {dict(counts)}; calm during the flood {dict(during)}",
            ok_flood and during and set(during) == {"200"})
    rep.row("adapters: GET /v1/adapters is admitted (during the flood)", "429 naming `max_concurrent_requests` "
            "for rowdy (at its bound), 200 for calm", f"rowdy {said(listed_rowdy)}, calm {said(listed_calm)}",
            listed_rowdy.status_code == 429 and error_of(listed_rowdy).get("param") == "max_concurrent_requests"
            and listed_calm.status_code == 200)


def image_inputs(rep: Report, url: str, keys: Keys, client: httpx.Client) -> None:
    def edit(image: bytes, name: str = "in.png") -> httpx.Response:
        return client.post(f"{url}/v1/images/edits", headers=bearer(keys.rowdy),
                           data={"prompt": "a blue square at the top", "model": MODEL, "size": "64x64", "seed": "1"},
                           files={"image": (name, image)})

    rep.status("image inputs: a 4096² PNG (request budget 2048²)",
               edit(encoded(Image.new("RGB", (4096, 4096), (200, 30, 30)))), 400, "image", "pixels")
    bomb = header_only_png(60_000, 60_000)
    rep.status(f"image inputs: a {len(bomb)}-byte PNG declaring 60000x60000 (decompression bomb)", edit(bomb),
               400, "image")
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    rep.status("image inputs: an animated PNG", edit(encoded(frames[0], "PNG", save_all=True,
                                                              append_images=frames[1:])), 400, "image", "animated")
    cmyk = encoded(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)
    rep.status("image inputs: a CMYK JPEG", edit(cmyk, "in.jpg"), 200)
    grey = np.zeros((64, 64, 3), np.uint16)
    grey[:, :32] = (65535, 32768, 0)
    rep.status("image inputs: a 16-bit RGB PNG", edit(png16(grey, 2)), 200)


def local_only(rep: Report, url: str, keys: Keys, client: httpx.Client) -> None:
    if keys.auth:
        rep.status("auth on: DELETE /v1/adapters/calm/style without a key",
                   client.delete(f"{url}/v1/adapters/{CALM}/style"), 401, "authorization")
        rep.na("auth off: Host: evil.example", "n/a with auth on (the keys guard the routes): the auth-off table")
        return
    rep.status("auth off: GET /v1/models with Host: evil.example", client.get(
        f"{url}/v1/models", headers={"Host": "evil.example"}), 421, "host")
    rep.status("auth off: DELETE /v1/adapters/local/style", client.delete(f"{url}/v1/adapters/local/style"), 403)


def headers(rep: Report, url: str, keys: Keys, client: httpx.Client) -> None:
    r = client.get(f"{url}/v1/models", headers=bearer(keys.calm))
    rep.row("headers: a JSON answer (GET /v1/models)", "200, X-Content-Type-Options: nosniff",
            f"{r.status_code}, {r.headers.get('x-content-type-options')}",
            r.status_code == 200 and r.headers.get("x-content-type-options") == "nosniff")
    r = client.get(f"{url}/playground")
    framed = "frame-ancestors 'none'" in r.headers.get("content-security-policy", "")
    rep.row("headers: the playground page", "200, a CSP with frame-ancestors 'none', X-Frame-Options: DENY",
            f"{r.status_code}, CSP {'with' if framed else 'without'} frame-ancestors 'none', X-Frame-Options "
            f"{r.headers.get('x-frame-options')}",
            r.status_code == 200 and framed and r.headers.get("x-frame-options") == "DENY")


def url_responses(rep: Report, url: str, keys: Keys, client: httpx.Client) -> None:
    if not keys.auth:
        rep.na("url responses: one tenant's burst does not evict another's image",
               "n/a with auth off (one tenant): checked by tests/test_image_store.py")
        return
    mine = client.post(f"{url}/v1/images/generations", headers=bearer(keys.calm),
                       json={**INNOCENT_BODY, "response_format": "url", "seed": 7})
    kept = mine.json()["data"][0]["url"] if mine.status_code == 200 else None
    burst = []
    for i in range(3):  # 12 images past the store's 8
        r = client.post(f"{url}/v1/images/generations", headers=bearer(keys.rowdy),
                        json={**INNOCENT_BODY, "n": 4, "response_format": "url", "seed": 100 + i})
        burst += [d["url"] for d in r.json()["data"]] if r.status_code == 200 else [None]
    time.sleep(3 * BENCH_ARGS["image_store_sweep_interval_s"] + 1)  # a sweep or two
    fetched = {u: client.get(u, headers=bearer(keys.calm)).status_code for u in [kept, *burst] if u}
    evicted = sum(1 for u in burst if u and fetched[u] == 404)
    rep.row(f"url responses: calm stores 1 image, then rowdy {len(burst)} (store bound "
            f"{BENCH_ARGS['image_store_max_files']})", "calm's image 200 after the burst; rowdy's oldest evicted",
            f"calm's {fetched.get(kept, mine.status_code)}; rowdy's: {evicted} of {len(burst)} evicted (404)",
            kept is not None and fetched[kept] == 200 and evicted >= 1 and None not in burst)


def fuzzing(rep: Report, url: str, keys: Keys, max_examples: int) -> dict:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    report = fuzz(schema, load_preset("lightray-shapes"), max_examples=max_examples, base_url=url,
                  headers=bearer(keys.rowdy) or None, log=lambda *a: None)
    summary = report.summary()
    server_errors = sum(n for (op, code), n in report.statuses.items() if isinstance(code, int) and code >= 500)
    failed = sorted({f["check"] for f in summary["failures"]})
    rep.row(f"fuzz: benchmarks/fuzz_api.py, {max_examples} cases per operation and mode", "no 5xx",
            f"{report.total_cases} cases, {server_errors} 5xx" + (f"; other checks failed: {failed}" if failed else ""),
            server_errors == 0 and report.total_cases > 0)
    return summary


# --------------------------------------------------------------------------------------------------- a phase

def running(replicas: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {name: sorted(r["replica_id"] for r in reps if r.get("state") == "RUNNING")
            for name, reps in replicas.items()}


def ingress_rss_mib(cluster: RayCluster | None) -> float | None:
    """The Ingress replicas' RSS (pids from Serve's status), on the local cluster only."""
    rows = replica_rss(cluster).get("Ingress") if cluster else None
    return round(sum(r["rss_mib"] for r in rows), 1) if rows else None


def run_phase(url: str, auth: bool, registry_root: str, cluster: RayCluster | None, args) -> dict:
    keys = Keys(auth)
    rep = Report("auth on" if auth else "auth off")
    print(f"\n== {rep.phase} ({url})", flush=True)
    before = cluster.replicas() if cluster else {}
    rss_before = ingress_rss_mib(cluster)
    load = InnocentLoad(url, keys.calm).start()
    time.sleep(args.quiet_s)
    load.window = "hostile"
    t0 = time.monotonic()
    fuzz_summary = None
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp, httpx.Client(timeout=300) as client:
        try:
            probes = readiness(rep, url)
            bodies(rep, url, keys, client)
            adapters(rep, url, keys, client, registry_root, tmp)
            tenants(rep, url, keys, client, load)
            image_inputs(rep, url, keys, client)
            local_only(rep, url, keys, client)
            headers(rep, url, keys, client)
            url_responses(rep, url, keys, client)
            fuzz_summary = fuzzing(rep, url, keys, args.fuzz_examples)
        finally:
            hostile_s = time.monotonic() - t0
            load.stop()
    after = cluster.replicas() if cluster else {}
    restarted = {name: sorted(set(ids) - set(running(after).get(name, [])))
                 for name, ids in running(before).items()}
    rss_after = ingress_rss_mib(cluster)
    innocent_503 = sum(n for s, n in load.statuses().items() if s == "503")
    numbers = {
        "false_503s": {"innocent": innocent_503, "readyz": sum(1 for s in probes if s == 503)},
        "innocent_statuses": {w: load.statuses(w) for w in ("quiet", "hostile", "flood")},
        "innocent_p50_ms": {"without_hostile": load.p50_ms("quiet"), "with_hostile": load.p50_ms("hostile"),
                            "during_the_flood": load.p50_ms("flood")},
        "replicas_before": running(before), "replicas_after": running(after),
        "replicas_restarted": {k: v for k, v in restarted.items() if v} if cluster else None,
        "ingress_rss_mib": {"before": rss_before, "after": rss_after,
                            "growth": round(rss_after - rss_before, 1) if rss_before and rss_after else None},
        "hostile_s": round(hostile_s, 1),
    }
    print(json.dumps(numbers, indent=1), flush=True)
    return {"phase": rep.phase, "url": url, "rows": rep.rows, "numbers": numbers, "fuzz": fuzz_summary}


def markdown(phase: dict) -> str:
    lines = [f"### {phase['phase']}", "", "| case | expected | got | ok |", "| --- | --- | --- | --- |"]
    for r in phase["rows"]:
        ok = "n/a" if r["ok"] is None else "yes" if r["ok"] else "**NO**"
        lines.append(f"| {r['case']} | {r['expected']} | {r['got'].replace('|', '/')} | {ok} |")
    n = phase["numbers"]
    lines += ["", "| figure | value |", "| --- | --- |",
              f"| false 503s (innocent tenant / `/readyz`) | {n['false_503s']['innocent']} / {n['false_503s']['readyz']} |",
              f"| innocent statuses (quiet / hostile / flood) | {n['innocent_statuses']['quiet']} / "
              f"{n['innocent_statuses']['hostile']} / {n['innocent_statuses']['flood']} |",
              f"| innocent p50, without / with hostile traffic / during rowdy's flood (ms) | "
              f"{n['innocent_p50_ms']['without_hostile']} / {n['innocent_p50_ms']['with_hostile']} / "
              f"{n['innocent_p50_ms']['during_the_flood']} |",
              f"| replicas restarted | {n['replicas_restarted'] if n['replicas_restarted'] is not None else 'n/a'} |",
              f"| ingress RSS before → after (MiB) | {n['ingress_rss_mib']['before']} → {n['ingress_rss_mib']['after']} "
              f"({n['ingress_rss_mib']['growth']:+}) |" if n['ingress_rss_mib']['growth'] is not None
              else "| ingress RSS | n/a |",
              f"| hostile traffic lasted (s) | {n['hostile_s']} |"]
    return "\n".join(lines)


def wait_for_auth(url: str, auth: bool, timeout: float = 300) -> None:
    """Until the deployed app is the one asked for (a redeploy serves the old app for a while)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=10).status_code == (401 if auth else 200) and \
                    httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the service at {url} did not come up with auth {'on' if auth else 'off'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service (configured as the docstring says) instead of a local cluster")
    p.add_argument("--registry", help="with --url: the registry folder the service's `registry` arg names")
    p.add_argument("--phases", nargs="+", choices=["on", "off"], default=["on", "off"], help="auth on / off")
    p.add_argument("--quiet-s", type=float, default=20, help="the innocent load alone first, for its p50")
    p.add_argument("--fuzz-examples", type=int, default=5, help="fuzz cases per operation and mode")
    p.add_argument("--print-keys", action="store_true", help="print LIGHTRAY_API_KEYS for --url and exit")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/hostile.json")
    args = p.parse_args(argv)
    if args.print_keys:
        print(json.dumps(KEYS))
        return 0
    if args.url and not args.registry:
        p.error("--url needs --registry (adapters are published into the service's registry folder)")
    results = {"date": time.strftime("%Y-%m-%d"), "device": "cpu (2 cores, shared)", "model": MODEL,
               "bench_args": BENCH_ARGS, "phases": []}
    work = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    cluster = None
    try:
        if not args.url:
            cluster = RayCluster().start()
        for phase in args.phases:
            auth = phase == "on"
            url, registry_root = args.url, args.registry
            if cluster:
                url, registry_root = cluster.http_url, str(work / f"registry-{phase}")
                cluster.deploy(cluster.serve_config(REPO / "configs/serve/local.yaml", {
                    **BENCH_ARGS, "registry": registry_root, "image_store_dir": str(work / f"images-{phase}"),
                    "auth_enabled": auth, **({"api_keys": KEYS} if auth else {})}, ONE_DENOISER))
            wait_for_auth(url.rstrip("/"), auth)
            results["phases"].append(run_phase(url.rstrip("/"), auth, registry_root, cluster, args))
    finally:
        if cluster:
            cluster.stop()
    for phase in results["phases"]:
        print("\n" + markdown(phase))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["ok"] is not False for ph in results["phases"] for r in ph["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

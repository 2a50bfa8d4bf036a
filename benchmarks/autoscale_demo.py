"""Per-stage autoscaling, demonstrated on this machine: the Denoiser scales up under load and back down when the
load stops, while the fixed stages (TextEncoder, VaeDecoder, Ingress) stay at their size.

Starts its own local Ray cluster (loopback only), deploys configs/serve/local.yaml unchanged apart from the
HTTP port, and drives load in phases: idle → high concurrency → idle. Every `--sample-s` it records the RUNNING
replicas per deployment as Serve itself reports them (the dashboard's `GET /api/serve/applications/`, which
`serve status` reads too). Bounded: at most `--max-requests` requests and `--deadline-s` seconds in all.

    .venv/bin/python benchmarks/autoscale_demo.py            # ≈ 3-4 minutes on 2 cores

Writes docs/autoscaling.json (time series + summary) and docs/img/autoscaling.png, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import httpx
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent

from testing.local_cluster import RayCluster  # noqa: E402

DEPLOYMENTS = ("Ingress", "TextEncoder", "Denoiser", "VaeDecoder")
COLORS = {"Ingress": (120, 120, 120), "TextEncoder": (31, 119, 180), "Denoiser": (214, 39, 40),
          "VaeDecoder": (44, 160, 44)}


def replica_counts(cluster: RayCluster, app: str = "lightray") -> dict[str, dict[str, int]]:
    """{"running": deployment → RUNNING replicas, "target": deployment → the controller's target_num_replicas}"""
    deployments = cluster.serve_details()["applications"][app]["deployments"]
    return {
        "running": {n: sum(r["state"] == "RUNNING" for r in d["replicas"]) for n, d in deployments.items()},
        "target": {n: d.get("target_num_replicas", 0) for n, d in deployments.items()},
    }


def summarize(samples: list[dict], phases: list[dict], deployment: str = "Denoiser") -> dict:
    """Scale-up / scale-down figures for one deployment from the sampled series.

    `samples`: [{"t": seconds, "running": {deployment: n}}], `phases`: [{"name", "start", "end"}] with the load
    phase named "load". Scale-up time: from the load's start to the first sample at the peak count; scale-down
    time: from the load's end to the first sample back at the count before the load."""
    load = next(p for p in phases if p["name"] == "load")
    series = [(s["t"], s["running"].get(deployment, 0)) for s in samples]
    before = [n for t, n in series if t < load["start"]]
    baseline = before[-1] if before else series[0][1]
    during = [(t, n) for t, n in series if t >= load["start"]]
    peak = max((n for _, n in during), default=baseline)
    t_peak = next((t for t, n in during if n == peak), None)
    first_up = next((t for t, n in during if n > baseline), None)
    targets = [(s["t"], s.get("target", {}).get(deployment, 0)) for s in samples if s["t"] >= load["start"]]
    t_decided = next((t for t, n in targets if n > baseline), None)
    after = [(t, n) for t, n in series if t >= load["end"]]
    t_down = next((t for t, n in after if n <= baseline), None)
    return {
        "deployment": deployment,
        "baseline_replicas": baseline,
        "peak_replicas": peak,
        "target_raised_s": None if t_decided is None else round(t_decided - load["start"], 1),
        "first_upscale_s": None if first_up is None else round(first_up - load["start"], 1),
        "time_to_peak_s": None if t_peak is None else round(t_peak - load["start"], 1),
        "time_to_scale_down_s": None if t_down is None else round(t_down - load["end"], 1),
        "final_replicas": series[-1][1] if series else None,
    }


async def _drive(url: str, concurrency: int, duration_s: float, max_requests: int, body: dict,
                 stats: dict) -> None:
    """`concurrency` clients sending back-to-back requests until `duration_s` passes or `max_requests` went out."""
    stop_at = time.monotonic() + duration_s
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < stop_at and sent < max_requests:
            sent += 1
            t0 = time.monotonic()
            try:
                r = await http.post(f"{url}/v1/images/generations", json={**body, "seed": sent})
                key = str(r.status_code)
            except httpx.HTTPError as err:
                key = type(err).__name__
            stats["status"][key] = stats["status"].get(key, 0) + 1
            stats["latency_s"].append(round(time.monotonic() - t0, 3))

    async with httpx.AsyncClient(timeout=180) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))


def plot(samples: list[dict], phases: list[dict], path: Path, title: str) -> None:
    """Replicas per deployment vs time, the load phase shaded (PIL: no plotting library needed)."""
    W, H, L, R, T, B = 900, 420, 60, 170, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    t_max = max(max(s["t"] for s in samples), phases[-1]["end"])
    y_max = max(3, max(max(s["running"].values(), default=0) for s in samples)) + 0.5
    x = lambda t: L + (W - L - R) * t / t_max  # noqa: E731
    y = lambda n: H - B - (H - T - B) * n / y_max  # noqa: E731
    for p in phases:
        if p["name"] == "load":
            d.rectangle([x(p["start"]), T, x(p["end"]), H - B], fill=(255, 236, 200))
            d.text((x(p["start"]) + 4, T + 4), f"load ({p.get('concurrency', '?')} concurrent)", fill=(150, 90, 0))
    d.line([L, T, L, H - B, W - R, H - B], fill="black")
    for n in range(int(y_max) + 1):
        d.line([L - 4, y(n), W - R, y(n)], fill=(225, 225, 225) if n else "black")
        d.text((L - 16, y(n) - 6), str(n), fill="black")
    step = 30 if t_max > 120 else 15
    for t in range(0, int(t_max) + 1, step):
        d.line([x(t), H - B, x(t), H - B + 4], fill="black")
        d.text((x(t) - 8, H - B + 8), f"{t}", fill="black")
    d.text((L + (W - L - R) / 2 - 40, H - 20), "time (s)", fill="black")
    d.text((8, T - 18), "RUNNING replicas (dashed: Denoiser target)", fill="black")
    d.text((L + 280, 8), title, fill="black")
    for i, name in enumerate(DEPLOYMENTS):
        offset = (i - 1.5) * 0.04  # keep overlapping lines visible
        pts = []
        for s in samples:
            n = s["running"].get(name, 0) + offset
            if pts:
                pts.append((x(s["t"]), pts[-1][1]))  # step plot
            pts.append((x(s["t"]), y(n)))
        d.line(pts, fill=COLORS[name], width=3)
        if name == "Denoiser":  # the controller's decision, dashed: the gap to the solid line is start-up time
            for a, b in zip(samples, samples[1:]):
                n = a.get("target", {}).get(name, 0) + 0.1
                for x0 in range(int(x(a["t"])), int(x(b["t"])), 8):
                    d.line([x0, y(n), min(x0 + 4, x(b["t"])), y(n)], fill=(240, 130, 130), width=2)
        ly = T + 20 + 20 * i
        d.line([W - R + 15, ly, W - R + 40, ly], fill=COLORS[name], width=3)
        d.text((W - R + 45, ly - 6), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _title(summary: dict) -> str:
    return (f"Denoiser: peak {summary['peak_replicas']} replicas, target raised {summary['target_raised_s']} s "
            f"into the load, running {summary['time_to_peak_s']} s, back down {summary['time_to_scale_down_s']} s "
            "after it")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/serve/local.yaml"))
    ap.add_argument("--idle-before-s", type=float, default=20)
    ap.add_argument("--load-s", type=float, default=60)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=600)
    ap.add_argument("--idle-after-max-s", type=float, default=120, help="stop earlier once scaled back down")
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--deadline-s", type=float, default=480, help="hard bound on the whole run after deploy")
    ap.add_argument("--model", default="lightray-shapes-lightning-8")
    ap.add_argument("--out-json", default=str(REPO / "docs/autoscaling.json"))
    ap.add_argument("--out-png", default=str(REPO / "docs/img/autoscaling.png"))
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --out-json")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.out_json).read_text())
        plot(saved["samples"], saved["phases"], Path(args.out_png), _title(saved["summary"]))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the cluster

    body = {"prompt": "a red circle on the left, white background", "model": args.model, "size": "64x64", "n": 1}
    cluster = RayCluster().start()
    try:
        t_deploy = time.time()
        config = cluster.serve_config(Path(args.config))
        cluster.deploy(config)
        print(f"deployed and ready in {time.time() - t_deploy:.0f} s", flush=True)
        denoiser_cfg = next(d for d in yaml.safe_load(config.read_text())["applications"][0]["deployments"]
                            if d["name"] == "Denoiser")
        samples: list[dict] = []
        phases: list[dict] = []
        stats = {"status": {}, "latency_s": []}
        t0 = time.monotonic()
        hard_stop = t0 + args.deadline_s
        now = lambda: time.monotonic() - t0  # noqa: E731

        async def sampler(stop: asyncio.Event) -> None:
            while not stop.is_set() and time.monotonic() < hard_stop:
                try:
                    counts = await asyncio.to_thread(replica_counts, cluster)
                    samples.append({"t": round(now(), 2), **counts})
                except httpx.HTTPError as err:
                    print(f"  (status read failed: {err})", flush=True)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=args.sample_s)
                except asyncio.TimeoutError:
                    pass

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(sampler(stop))
            phases.append({"name": "idle", "start": 0.0})
            await asyncio.sleep(args.idle_before_s)
            phases[-1]["end"] = round(now(), 2)
            phases.append({"name": "load", "start": round(now(), 2), "concurrency": args.concurrency})
            print(f"[{now():6.1f}s] load: {args.concurrency} concurrent clients for {args.load_s:g} s", flush=True)
            await asyncio.wait_for(
                _drive(cluster.http_url, args.concurrency, args.load_s, args.max_requests, body, stats),
                timeout=max(1.0, hard_stop - time.monotonic()),
            )
            phases[-1]["end"] = round(now(), 2)
            phases.append({"name": "idle", "start": round(now(), 2)})
            print(f"[{now():6.1f}s] idle; waiting for the Denoiser to scale back down", flush=True)
            idle_until = min(time.monotonic() + args.idle_after_max_s, hard_stop)
            base = samples[0]["running"].get("Denoiser", 1) if samples else 1
            while time.monotonic() < idle_until:
                await asyncio.sleep(args.sample_s)
                if samples and samples[-1]["running"].get("Denoiser", 0) <= base and \
                        samples[-1]["t"] > phases[-1]["start"] + 5:
                    await asyncio.sleep(10)  # a little flat tail for the figure
                    break
            phases[-1]["end"] = round(now(), 2)
            stop.set()
            await task

        asyncio.run(scenario())
    finally:
        cluster.stop()

    summary = summarize(samples, phases)
    latencies = sorted(stats["latency_s"])
    result = {
        "config": {"file": str(Path(args.config).relative_to(REPO)), "denoiser": denoiser_cfg,
                   "load": {"concurrency": args.concurrency, "duration_s": args.load_s, "request": body}},
        "machine": {"cpus_for_ray": cluster.num_cpus},
        "requests": {"status": stats["status"], "count": len(latencies),
                     "p50_s": latencies[len(latencies) // 2] if latencies else None,
                     "max_s": latencies[-1] if latencies else None},
        "summary": summary,
        "fixed_stages_max": {name: max(s["running"].get(name, 0) for s in samples) for name in DEPLOYMENTS
                             if name != "Denoiser"},
        "phases": phases,
        "samples": samples,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=1) + "\n")
    plot(samples, phases, Path(args.out_png), _title(summary))

    print(f"\n{'t (s)':>7} {'phase':<6} " + " ".join(f"{n:>11}" for n in DEPLOYMENTS))
    last = None
    for s in samples:
        row = tuple(s["running"].get(n, 0) for n in DEPLOYMENTS)
        if row != last:  # print the changes only
            phase = next((p["name"] for p in phases if p["start"] <= s["t"] <= p.get("end", 1e9)), "")
            print(f"{s['t']:7.1f} {phase:<6} " + " ".join(f"{v:>11}" for v in row))
            last = row
    print(f"\nrequests: {stats['status']}  p50 {result['requests']['p50_s']} s  max {result['requests']['max_s']} s")
    print("summary:", json.dumps(summary))
    print(f"wrote {args.out_json} and {args.out_png}")


if __name__ == "__main__":
    main()

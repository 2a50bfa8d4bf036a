"""Overload and timeouts on the local service: what a burst beyond capacity gets, how fast, and
what happens to work that outlives its request timeout.

    python benchmarks/overload.py [--burst 60] [--timeout-s 5]

Deploys configs/serve/local.yaml on a fresh local Ray cluster (its own admission bound and queues; only
`request_timeout_s` is lowered, so that a timeout can be shown in seconds) and runs, in one go:
1. a burst of `--burst` concurrent base-model requests (20 steps + true CFG): status counts, latency by status,
   and the Retry-After of the 503s;
2. a request whose work takes minutes (256², 2 images, 100 steps, CFG): its 504 and elapsed time, the step the
   Denoiser stopped at (from its log), and the latency of a small request sent right after it.
Prints a table and writes benchmarks/results/overload.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import re
import statistics
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent

from testing.local_cluster import RayCluster  # noqa: E402

BUSY = {"prompt": "a blue square at the top, gray background", "model": "lightray-shapes", "size": "64x64"}
SLOW = {**BUSY, "size": "256x256", "n": 2, "num_inference_steps": 100, "true_cfg_scale": 4.0, "seed": 2}
FAST = {"prompt": "a red circle on the left, white background", "model": "lightray-shapes-lightning-4", "seed": 1}


def post(url: str, body: dict) -> dict:
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
    return {"status": r.status_code, "ms": (time.monotonic() - start) * 1000,
            "retry_after": r.headers.get("retry-after"), "code": r.json().get("error", {}).get("code")
            if r.status_code != 200 else None}


def burst(url: str, n: int) -> dict:
    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: post(url, {**BUSY, "seed": i}), range(n)))
    by_status: dict[str, dict] = {}
    for status in sorted({r["status"] for r in results}):
        ms = [r["ms"] for r in results if r["status"] == status]
        by_status[str(status)] = {"count": len(ms), "p50_ms": statistics.median(ms), "max_ms": max(ms),
                                  "retry_after": sorted({r["retry_after"] for r in results
                                                         if r["status"] == status and r["retry_after"]})}
    return {"requests": n, "by_status": by_status}


def timeout_run(cluster: RayCluster) -> dict:
    slow = post(cluster.http_url, SLOW)
    fast = post(cluster.http_url, FAST)
    deadline, stopped = time.time() + 60, None
    while stopped is None and time.time() < deadline:
        logs = Path(cluster.temp_dir, "session_latest/logs/serve").glob("replica_lightray_Denoiser_*.log")
        found = re.findall(r"cancelled after step (\d+) of (\d+)", "".join(p.read_text(errors="replace") for p in logs))
        stopped = [int(a) for a, _ in found][-1] if found else None
        time.sleep(0.5)
    return {"slow_status": slow["status"], "slow_code": slow["code"], "slow_ms": slow["ms"],
            "stopped_after_step": stopped, "of_steps": SLOW["num_inference_steps"],
            "next_request_status": fast["status"], "next_request_ms": fast["ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=60)
    parser.add_argument("--timeout-s", type=float, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/overload.json")
    args = parser.parse_args()
    local = yaml.safe_load((REPO / "configs/serve/local.yaml").read_text())["applications"][0]
    cluster = RayCluster().start()
    try:
        cluster.deploy(cluster.serve_config(REPO / "configs/serve/local.yaml", {"request_timeout_s": args.timeout_s}))
        results = {"config": "configs/serve/local.yaml", "max_concurrent_requests":
                   local["args"]["max_concurrent_requests"], "request_timeout_s": args.timeout_s,
                   "device": "cpu (2 cores)", "burst": burst(cluster.http_url, args.burst)}
        results["timeout"] = timeout_run(cluster)
    finally:
        cluster.stop()

    print(f"\nburst of {args.burst} concurrent base-model requests (admission bound "
          f"{results['max_concurrent_requests']} per ingress replica)")
    print(f"{'status':>8s} {'count':>6s} {'p50 ms':>9s} {'max ms':>9s}  Retry-After")
    for status, row in results["burst"]["by_status"].items():
        print(f"{status:>8s} {row['count']:6d} {row['p50_ms']:9.0f} {row['max_ms']:9.0f}  {','.join(row['retry_after'])}")
    t = results["timeout"]
    print(f"\nrequest of minutes' work, timeout {args.timeout_s:g} s: {t['slow_status']} ({t['slow_code']}) after "
          f"{t['slow_ms']:.0f} ms; Denoiser stopped after step {t['stopped_after_step']} of {t['of_steps']}; "
          f"next small request: {t['next_request_status']} in {t['next_request_ms']:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

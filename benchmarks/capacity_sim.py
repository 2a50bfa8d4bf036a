"""A discrete-event simulator of the Lightray graph: arrivals → TextEncoder → Denoiser engines (step-level batching)
→ VaeDecoder, with replicas per stage fixed or autoscaled (Serve's ongoing-request target, or the engine's work in
seconds: deployments/autoscaling.py). It predicts p50/p95 latency, replicas over time and replica-seconds.

Inputs:
* per-stage time curves (`Curves`): the TextEncoder's seconds per request, the Denoiser's forward time
  `fixed_s + per_token_row_s x token-rows` (one forward per latent grid in a step, at most `max_batch_rows` rows a
  step), the VaeDecoder's seconds per image by token count. `Curves.cpu_from_calibration` fits them from requests
  timed alone on this machine (benchmarks/multinode.py does); `Curves.gpu_assumed` takes docs/capacity.md's 1024²
  figures (all **assumed**: no GPU was measured);
* an arrival trace: [(t, RequestType)] (`mixed_trace`, `burst_trace`, `diurnal_trace`).

    python benchmarks/capacity_sim.py          # the GPU table for docs/capacity.md (100 and 1,000 images/s)

Simplifications, stated: routing to the least-loaded replica; the TextEncoder and VaeDecoder serve one request at a
time per replica (no cross-request batching); a new replica serves after `start_s`; no network time beyond a fixed
`hop_s` per request.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestType:
    name: str
    steps: int
    rows: int  # n x (2 with true CFG)
    tokens: int  # noise tokens per row: (side / 16)^2
    images: int


LIGHTNING4_128 = RequestType("lightning4-128", 4, 1, 64, 1)
BASE50_CFG_256_N4 = RequestType("base50-cfg-256-n4", 50, 8, 256, 4)
LIGHTNING8_1024 = RequestType("lightning8-1024", 8, 1, 4096, 1)


@dataclass
class Curves:
    te_s: float  # seconds per request
    fixed_s: float  # Denoiser forward, fixed part
    per_token_row_s: float
    vae_s_per_token: float  # VAE decode seconds per image per noise token (decode cost ~ pixels)
    vae_fixed_s: float = 0.0
    hop_s: float = 0.0
    max_batch_rows: int = 8
    max_live: int = 16
    starvation_steps: int = 200  # EngineConfig's default
    shared_cores: float | None = None
    """All stages on this many shared cores (the local cluster: every replica on one machine's CPUs): a task that
    starts while k others run takes max(1, (k + 1) / shared_cores) times as long. None: each replica owns its device
    (a GPU cluster)."""
    source: str = ""

    def forward_s(self, token_rows: float) -> float:
        return self.fixed_s + self.per_token_row_s * token_rows

    def vae_s(self, rt: RequestType) -> float:
        return self.vae_fixed_s + rt.images * rt.tokens * self.vae_s_per_token

    @classmethod
    def gpu_assumed(cls) -> "Curves":
        """docs/capacity.md at 1024² on an H100 (all assumed): row-step 175 ms, fixed 20 ms, VAE 262 ms per image,
        a ~100-token prompt 9.8 ms; 20 ms of hops."""
        return cls(te_s=0.0098, fixed_s=0.020, per_token_row_s=0.175 / 4096, vae_s_per_token=0.262 / 4096,
                   hop_s=0.02, source="assumed: docs/capacity.md (H100, 1024²)")

    @classmethod
    def cpu_from_calibration(cls, alone: dict[str, dict[str, float]], hop_s: float = 0.0) -> "Curves":
        """Fit from requests timed alone: `alone[type name]` = {"encode", "denoise", "decode"} seconds for
        LIGHTNING4_128 and BASE50_CFG_256_N4. Two forward sizes give the line's two coefficients."""
        a, b = LIGHTNING4_128, BASE50_CFG_256_N4
        ya, yb = alone[a.name]["denoise"] / a.steps, alone[b.name]["denoise"] / b.steps
        xa, xb = a.rows * a.tokens, b.rows * b.tokens
        per = max((yb - ya) / (xb - xa), 0.0)
        fixed = max(ya - per * xa, 0.0)
        da, db = alone[a.name]["decode"], alone[b.name]["decode"]
        pa, pb = a.images * a.tokens, b.images * b.tokens
        vper = max((db - da) / (pb - pa), 0.0)
        return cls(te_s=(alone[a.name]["encode"] + alone[b.name]["encode"]) / 2, fixed_s=fixed,
                   per_token_row_s=per, vae_s_per_token=vper, vae_fixed_s=max(da - vper * pa, 0.0), hop_s=hop_s,
                   source="measured: requests timed alone on this CPU (Server-Timing)")


@dataclass
class Policy:
    kind: str  # "fixed", "ongoing" (Serve's target_ongoing_requests) or "work" (WorkSecondsPolicy)
    min_replicas: int = 1
    max_replicas: int = 1
    target: float = 4.0  # ongoing requests per replica, or work seconds per replica
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 20.0
    look_back_s: float = 12.0
    start_s: float = 10.0  # a new replica's cold start
    period_s: float = 1.0


@dataclass
class _Req:
    rt: RequestType
    t0: float
    seq: int = 0
    left: int = 0
    waited: int = 0
    done_at: float | None = None


class _Engine:
    def __init__(self, up_at: float):
        self.up_at = up_at
        self.live: list[_Req] = []
        self.queue: list[_Req] = []
        self.busy = False
        self.draining = False


@dataclass
class SimResult:
    latencies: list[float]
    replicas: list[tuple[float, int]]  # Denoiser replicas over time
    replica_seconds: float
    peak_replicas: int

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]

    def summary(self) -> dict:
        return {"requests": len(self.latencies), "p50_s": round(self.pct(0.5), 3), "p95_s": round(self.pct(0.95), 3),
                "replica_seconds": round(self.replica_seconds, 1), "peak_replicas": self.peak_replicas}


def simulate(trace: list[tuple[float, RequestType]], curves: Curves, policy: Policy, te_replicas: int = 1,
             vae_replicas: int = 1, horizon_s: float | None = None) -> SimResult:
    """Runs the trace through the graph; the Denoiser's replicas follow `policy`."""
    events: list = []
    seq = 0

    def push(t, kind, data=None):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    for t, rt in trace:
        push(t, "arrive", rt)
    te_free = [0.0] * te_replicas
    vae_free = [0.0] * vae_replicas
    engines = [_Engine(0.0) for _ in range(policy.min_replicas)]
    end = horizon_s if horizon_s is not None else (trace[-1][0] if trace else 0.0)
    latencies: list[float] = []
    series: list[tuple[float, int]] = [(0.0, len(engines))]
    samples: list[tuple[float, float]] = []  # (t, metric) for the look-back window
    want_since: dict[str, float | None] = {"up": None, "down": None}
    replica_seconds = 0.0
    last_t = 0.0
    outstanding = len(trace)
    if policy.kind != "fixed":
        push(policy.period_s, "autoscale")

    def slow(t: float) -> float:
        if not curves.shared_cores:
            return 1.0
        busy = sum(f > t for f in te_free) + sum(f > t for f in vae_free) + sum(e.busy for e in engines)
        return max(1.0, (busy + 1) / curves.shared_cores)

    def ready(e: _Engine, t: float) -> bool:
        return e.up_at <= t and not e.draining

    def step(e: _Engine, t: float) -> None:
        while e.queue and len(e.live) < curves.max_live:
            r = e.queue.pop(0)
            r.left = r.rt.steps
            e.live.append(r)
        if not e.live:
            e.busy = False
            return
        # The engine's StepScheduler (one tenant): requests that waited `starvation_steps` first, then the least
        # remaining work (rows x steps left) first; the step stops at the first request that does not fit.
        starving = sorted((r for r in e.live if r.waited >= curves.starvation_steps), key=lambda r: r.seq)
        rest = sorted((r for r in e.live if r.waited < curves.starvation_steps),
                      key=lambda r: (r.rt.rows * r.left, r.seq))
        rows, chosen = 0, []
        for r in starving + rest:
            if chosen and rows + r.rt.rows > curves.max_batch_rows:
                break
            chosen.append(r)
            rows += r.rt.rows
        for r in e.live:
            r.waited = 0 if r in chosen else r.waited + 1
        grids: dict[int, int] = {}
        for r in chosen:
            grids[r.rt.tokens] = grids.get(r.rt.tokens, 0) + r.rt.rows * r.rt.tokens
        e.busy = False
        dur = sum(curves.forward_s(tr) for tr in grids.values()) * slow(t)
        e.busy = True
        push(t + dur, "step_done", (e, chosen))

    while events:
        t, _, kind, data = heapq.heappop(events)
        live_replicas = sum(1 for e in engines if not e.draining)
        replica_seconds += live_replicas * (t - last_t)
        last_t = t
        if kind == "arrive":
            req = _Req(data, t, seq)
            i = min(range(te_replicas), key=lambda k: te_free[k])
            start = max(t, te_free[i])
            te_free[i] = start + curves.te_s * slow(start)
            push(te_free[i] + curves.hop_s / 2, "to_denoiser", req)
        elif kind == "to_denoiser":
            candidates = [e for e in engines if ready(e, t)] or [e for e in engines if not e.draining]
            e = min(candidates, key=lambda e: (len(e.live) + len(e.queue), e.up_at))
            e.queue.append(data)
            if not e.busy and e.up_at <= t:
                step(e, t)
        elif kind == "replica_up":
            if not data.busy and data.queue:
                step(data, t)
        elif kind == "step_done":
            e, chosen = data
            for r in chosen:
                r.left -= 1
                if r.left == 0:
                    e.live.remove(r)
                    i = min(range(vae_replicas), key=lambda k: vae_free[k])
                    start = max(t, vae_free[i])
                    vae_free[i] = start + curves.vae_s(r.rt) * slow(start)
                    push(vae_free[i] + curves.hop_s / 2, "done", r)
            if e.draining and not e.live and not e.queue:
                e.busy = False
                engines.remove(e)
            else:
                step(e, t)
        elif kind == "done":
            latencies.append(t - data.t0)
            outstanding -= 1
        elif kind == "autoscale":
            active = [e for e in engines if not e.draining]
            if policy.kind == "ongoing":
                metric = sum(len(e.live) + len(e.queue) for e in active)
            else:  # seconds of work left, as the engine reports it
                metric = sum(
                    sum(r.rt.rows * r.left * r.rt.tokens for r in e.live) * curves.per_token_row_s
                    + sum(r.rt.rows * r.rt.steps * r.rt.tokens for r in e.queue) * curves.per_token_row_s
                    + max([r.left for r in e.live] + [r.rt.steps for r in e.queue] + [0]) * curves.fixed_s
                    for e in active)
            samples.append((t, metric))
            samples = [(ts, m) for ts, m in samples if ts > t - policy.look_back_s]
            avg = sum(m for _, m in samples) / len(samples)
            desired = math.ceil(avg / policy.target - 1e-9) if avg > 0 else policy.min_replicas
            desired = max(policy.min_replicas, min(policy.max_replicas, desired))
            n = len(active)
            if desired > n:
                want_since["down"] = None
                want_since["up"] = want_since["up"] if want_since["up"] is not None else t
                if t - want_since["up"] >= policy.upscale_delay_s:
                    for _ in range(desired - n):
                        e = _Engine(t + policy.start_s)
                        engines.append(e)
                        push(t + policy.start_s, "replica_up", e)
                    want_since["up"] = None
            elif desired < n:
                want_since["up"] = None
                want_since["down"] = want_since["down"] if want_since["down"] is not None else t
                if t - want_since["down"] >= policy.downscale_delay_s:
                    for e in sorted(active, key=lambda e: len(e.live) + len(e.queue))[: n - desired]:
                        e.draining = True
                        for r in e.queue:  # not started: re-routed
                            push(t, "to_denoiser", r)
                        e.queue = []
                        if not e.live:
                            engines.remove(e)
                    want_since["down"] = None
            else:
                want_since["up"] = want_since["down"] = None
            series.append((t, len([e for e in engines if not e.draining])))
            if outstanding > 0 or t < end:
                push(t + policy.period_s, "autoscale")
    return SimResult(latencies, series, replica_seconds, max(n for _, n in series))


# -- traces ------------------------------------------------------------------------------------------------------

def poisson(rate: float, start: float, end: float, rng: random.Random) -> list[float]:
    out, t = [], start
    while True:
        t += rng.expovariate(rate) if rate > 0 else float("inf")
        if t >= end:
            return out
        out.append(t)


def mixed_trace(rate: float, duration_s: float, seed: int = 0, heavy_share: float = 0.2
                ) -> list[tuple[float, RequestType]]:
    """The Mixed trace: 80 % Lightning-4 at 128², 20 % base 50 steps with CFG at 256², n = 4, Poisson arrivals."""
    rng = random.Random(seed)
    return [(t, BASE50_CFG_256_N4 if rng.random() < heavy_share else LIGHTNING4_128)
            for t in poisson(rate, 0.0, duration_s, rng)]


def burst_trace(mean_rate: float, idle_s: float, burst_s: float, tail_s: float, seed: int = 1,
                rt: RequestType = LIGHTNING4_128) -> list[tuple[float, RequestType]]:
    """The Burst trace: idle, then 10x `mean_rate` for `burst_s`, then idle."""
    rng = random.Random(seed)
    return [(t, rt) for t in poisson(10 * mean_rate, idle_s, idle_s + burst_s, rng)]


def bench_traces() -> dict[str, tuple[list[tuple[float, RequestType]], float]]:
    """The two traces benchmarks/multinode.py sends to the local cluster (name → (trace, idle tail s)), scaled to 2
    shared cores: Mixed at 0.25 requests/s for 45 s; Burst idle 5 s, 10 x 0.1 requests/s for 30 s, idle 25 s."""
    return {"mixed": (mixed_trace(0.25, 45, seed=7), 25.0), "burst": (burst_trace(0.1, 5, 30, 25, seed=8), 25.0)}


SIM_POLICY = {"ongoing_requests": ("ongoing", 4.0), "work_seconds": ("work", 8.0)}
"""benchmarks/multinode.py's autoscaling policies as the simulator runs them (kind, target); 1-2 replicas."""


def validate(results: dict, start_s: float = 8.0, shared_cores: float | None = None) -> dict:
    """Predicted vs measured p95 for every trace and policy of a benchmarks/multinode.py result, from the curves its
    calibration measured."""
    c = results["calibration"]["curves"]
    curves = Curves(**{k: v for k, v in c.items() if k in Curves.__dataclass_fields__})
    curves.shared_cores = shared_cores
    out = {}
    for name, (trace, tail) in bench_traces().items():
        for policy, measured in results.get("autoscaling", {}).get(name, {}).items():
            kind, target = SIM_POLICY[policy]
            pred = simulate(trace, curves, Policy(kind, 1, 2, target=target, start_s=start_s),
                            horizon_s=trace[-1][0] + tail)
            m = measured["p95_s"]
            out.setdefault(name, {})[policy] = {
                "predicted_p95_s": round(pred.pct(0.95), 3), "measured_p95_s": m,
                "predicted_p50_s": round(pred.pct(0.5), 3), "measured_p50_s": measured["p50_s"],
                "predicted_replica_seconds": round(pred.replica_seconds, 1),
                "measured_replica_seconds": measured["replica_seconds"],
                "error": None if not m else round(pred.pct(0.95) / m - 1, 3)}
    return out


def diurnal_rate(hour: float, peak: float) -> float:
    """A day's rate: a cosine between 25 % of the peak (04:00) and the peak (16:00)."""
    return peak * (0.625 - 0.375 * math.cos(2 * math.pi * (hour - 4) / 24))


# -- the GPU table --------------------------------------------------------------------------------------------------

def replicas_for(rate: float, curves: Curves, rt: RequestType = LIGHTNING8_1024, busy: float = 0.7) -> dict:
    """Denoiser, TextEncoder and VaeDecoder replicas to serve `rate` requests/s at most `busy` utilised
    (full `max_batch_rows` steps on the Denoiser)."""
    step = curves.forward_s(curves.max_batch_rows * rt.tokens * rt.rows)
    per_denoiser = curves.max_batch_rows / (rt.steps * step)
    return {"Denoiser": math.ceil(rate / (per_denoiser * busy)),
            "TextEncoder": math.ceil(rate * curves.te_s / busy),
            "VaeDecoder": math.ceil(rate * curves.vae_s(rt) / busy)}


def gpu_table(rates=(100, 1000), scale_to: float = 10.0, seed: int = 3) -> list[dict]:
    """For each peak rate: replicas planned at the diurnal peak and for a 10x burst, and the simulated p50/p95 of
    (a) the peak hour and (b) a 60 s 10x burst on the peak-sized fleet with autoscaling on work seconds.
    Large fleets are simulated as a slice: `scale_to` requests/s through rate/scale_to of each stage's replicas
    (least-loaded routing over independent replicas scales linearly); the replica counts are the full fleet's."""
    curves = Curves.gpu_assumed()
    rows = []
    for rate in rates:
        plan = replicas_for(rate, curves)
        burst_plan = replicas_for(10 * rate, curves)
        k = rate / scale_to  # slice factor
        slice_ = {s: max(1, round(n / k)) for s, n in plan.items()}
        rng = random.Random(seed)
        peak = [(t, LIGHTNING8_1024) for t in poisson(scale_to, 0, 120, rng)]
        steady = simulate(peak, curves, Policy("fixed", slice_["Denoiser"], slice_["Denoiser"]),
                          slice_["TextEncoder"], slice_["VaeDecoder"])
        burst = [(t, LIGHTNING8_1024) for t in poisson(scale_to, 0, 30, rng)] + \
                [(t, LIGHTNING8_1024) for t in poisson(10 * scale_to, 30, 90, rng)] + \
                [(t, LIGHTNING8_1024) for t in poisson(scale_to, 90, 150, rng)]
        bslice = {s: max(1, round(n / k)) for s, n in burst_plan.items()}
        burst_sim = simulate(sorted(burst, key=lambda x: x[0]), curves,
                             Policy("work", slice_["Denoiser"], bslice["Denoiser"], target=8.0, start_s=340.0,
                                    upscale_delay_s=5, downscale_delay_s=600, look_back_s=30),
                             bslice["TextEncoder"], bslice["VaeDecoder"])
        burst_warm = simulate(sorted(burst, key=lambda x: x[0]), curves,
                              Policy("fixed", bslice["Denoiser"], bslice["Denoiser"]),
                              bslice["TextEncoder"], bslice["VaeDecoder"])
        gpus = lambda p: p["Denoiser"] + math.ceil(p["TextEncoder"] * 0.5 + p["VaeDecoder"] * 0.25)  # noqa: E731
        rows.append({
            "images_per_s": rate, "peak": plan, "peak_gpus": gpus(plan),
            "trough_gpus": gpus(replicas_for(rate * 0.25, curves)),
            "burst_10x": burst_plan, "burst_gpus": gpus(burst_plan),
            "peak_p50_s": round(steady.pct(0.5), 2), "peak_p95_s": round(steady.pct(0.95), 2),
            "burst_cold_p95_s": round(burst_sim.pct(0.95), 1),
            "burst_warm_p95_s": round(burst_warm.pct(0.95), 2),
        })
    return rows


def table_markdown(rows: list[dict]) -> str:
    out = ["| images/s (peak of the day) | Denoiser / TextEncoder / VaeDecoder at peak | GPUs at peak | GPUs at the "
           "04:00 trough (25 %) | p50 / p95 at peak | GPUs held for a 10x burst | burst p95, fleet pre-warmed | "
           "burst p95, autoscaled from peak (340 s cold start) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p, b = r["peak"], r["burst_10x"]
        out.append(f"| {r['images_per_s']:,} | {p['Denoiser']} / {p['TextEncoder']} / {p['VaeDecoder']} | "
                   f"{r['peak_gpus']} | {r['trough_gpus']} | {r['peak_p50_s']} / {r['peak_p95_s']} s | "
                   f"{r['burst_gpus']} | {r['burst_warm_p95_s']} s | {r['burst_cold_p95_s']} s |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write the table's rows here too")
    ap.add_argument("--validate", metavar="MULTINODE_JSON",
                    help="instead: predicted vs measured p95 for a benchmarks/multinode.py result")
    args = ap.parse_args()
    if args.validate:
        with open(args.validate) as f:
            print(json.dumps(validate(json.load(f)), indent=2))
        return
    rows = gpu_table()
    print(table_markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

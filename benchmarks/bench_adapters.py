"""Adapter costs on the Denoiser's code path, one run: cold load (registry fetch + `load_lora_weights`) from a
local-folder registry and from S3, warm switch between loaded adapters, and generation latency without an
adapter, with one, and alternating between two.

    python benchmarks/bench_adapters.py [--repeats 10] [--model lightray-shapes-lightning-4]

In process, without Ray: `AdapterRegistry.fetch` (download + sha256 check into an empty cache, as a Denoiser
replica's multiplexed loader does) and the denoising engine (`load_adapter`, `denoise`) are the exact calls
a replica makes; the Serve hop costs are measured by bench_graph.py. The S3 registry is a real SeaweedFS server
(`weed mini`, testing/s3_server.py) on loopback, so "S3" here is the protocol and client cost, not a WAN's.
Adapters: rank-16 LoRAs on every transformer target (`LORA_TARGETS`, the trainer's default; ≈ 2.4 MB each), with
seeded random weights. Prints a table, writes benchmarks/results/adapters.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from testing.adapters import make_lora_adapter  # noqa: E402
from lightray.config import load_preset  # noqa: E402
from lightray.contracts import AdapterUse  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.registry import AdapterRegistry  # noqa: E402
from lightray.schemas import ImageGenerationRequest  # noqa: E402
from lightray.engine import DenoiseEngine  # noqa: E402
from lightray.training.lora import LORA_TARGETS  # noqa: E402
from testing.s3_server import start_s3_server  # noqa: E402

PROMPT = "a red circle on the left, white background"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(values_ms: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(values_ms), 2), "p95_ms": round(pct(values_ms, 0.95), 2),
            "n": len(values_ms)}


def cold_loads(registry: AdapterRegistry, refs: list[str], preset, stage: DenoiseEngine) -> dict:
    """Per ref: fetch into an empty cache dir, then load into the pipeline (then unload, so the next is cold)."""
    fetch, load = [], []
    for i, ref in enumerate(refs):
        with tempfile.TemporaryDirectory(prefix="lra-bench-cache-") as cache:
            t0 = time.perf_counter()
            _, path = registry.fetch(ref, Path(cache) / "a", base_model_id=preset.base_model_id)
            t1 = time.perf_counter()
            stage.load_adapter(f"cold{i}", str(path))
            t2 = time.perf_counter()
            stage.unload_adapter(f"cold{i}")
        fetch.append(1000 * (t1 - t0))
        load.append(1000 * (t2 - t1))
    total = [f + x for f, x in zip(fetch, load)]
    return {"fetch": summary(fetch), "load_lora_weights": summary(load), "total": summary(total)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--model", default="lightray-shapes-lightning-4")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Serve replica runs 1)")
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/adapters.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    preset = load_preset("lightray-shapes")
    pipeline = LocalPipeline(preset)
    stage = pipeline.denoiser
    work = Path(tempfile.mkdtemp(prefix="lra-bench-adapters-"))
    sources = [make_lora_adapter(preset, work / f"src{i}", seed=i, rank=16, targets=tuple(LORA_TARGETS))
               for i in range(2)]
    size_mb = sum(f.stat().st_size for f in sources[0].iterdir()) / 1e6
    results: dict = {"model": args.model, "threads": args.threads, "repeats": args.repeats,
                     "adapter_rank": 16, "adapter_mb": round(size_mb, 2)}

    # Cold loads: each repeat is a new published version (a new ref), fetched into an empty cache.
    local = AdapterRegistry(str(work / "registry"))
    local_refs = [local.publish("bench", "cold", sources[i % 2], base_model_id=preset.base_model_id).ref
                  for i in range(args.repeats)]
    results["cold_local"] = cold_loads(local, local_refs, preset, stage)
    s3 = start_s3_server()
    try:
        remote = AdapterRegistry(s3.url("bench-registry"), storage_options=s3.storage_options)
        s3_refs = [remote.publish("bench", "cold", sources[i % 2], base_model_id=preset.base_model_id).ref
                   for i in range(args.repeats)]
        results["cold_s3"] = cold_loads(remote, s3_refs, preset, stage)
    finally:
        s3.stop()

    # Warm: both adapters loaded. The engine applies each row's adapters inside the forward, so there is no
    # per-request adapter switch to measure.
    stage.load_adapter("A", str(sources[0]))
    stage.load_adapter("B", str(sources[1]))

    # Generation latency (encode + denoise + decode, one 64x64 image) per adapter setting.
    def generate(adapter: str | None, seed: int) -> float:
        spec = ImageGenerationRequest.model_validate(
            {"prompt": PROMPT, "seed": seed, "model": args.model, "size": "64x64"}).resolve(preset, 0)
        if adapter is not None:
            spec = dataclasses.replace(spec, adapters=(AdapterUse(adapter),))
        t0 = time.perf_counter()
        pipeline.generate(spec)
        return 1000 * (time.perf_counter() - t0)

    for setting in (None, "A", "A|B"):  # warm-up
        generate(None if setting is None else "A", 0)
    gen = {"without adapter": [], "with adapter (same one)": [], "alternating adapters A/B": []}
    for i in range(args.repeats * 2):  # interleaved, so machine noise hits every setting alike
        gen["without adapter"].append(generate(None, i))
        gen["with adapter (same one)"].append(generate("A", i))
        gen["alternating adapters A/B"].append(generate("A" if i % 2 else "B", i))
    results["generation"] = {k: summary(v) for k, v in gen.items()}

    rows = [
        ("cold load, local registry: fetch", results["cold_local"]["fetch"]),
        ("cold load, local registry: load_lora_weights", results["cold_local"]["load_lora_weights"]),
        ("cold load, local registry: total", results["cold_local"]["total"]),
        ("cold load, S3 registry: fetch", results["cold_s3"]["fetch"]),
        ("cold load, S3 registry: load_lora_weights", results["cold_s3"]["load_lora_weights"]),
        ("cold load, S3 registry: total", results["cold_s3"]["total"]),
        *((f"generation, {k}", v) for k, v in results["generation"].items()),
    ]
    print("| measurement | p50 | p95 | n |\n| --- | --- | --- | --- |")
    for name, s in rows:
        print(f"| {name} | {s['p50_ms']:.1f} ms | {s['p95_ms']:.1f} ms | {s['n']} |")
    print(f"\nModel `{args.model}`, 64x64, rank-16 adapters ({size_mb:.1f} MB), torch {args.threads} thread(s), "
          f"in process, CPU.")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

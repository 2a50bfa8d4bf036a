"""Compiled against eager transformer steps on this CPU (issue 33): the embedded model's engine with
`EngineConfig(compile=True)` (regional compilation of the repeated block, inductor, dynamic row counts) beside an
eager engine, one torch thread, the same requests interleaved by row count so drift hits both alike.

    python benchmarks/bench_compile.py [--size 128] [--rows 1 2 4 8] [--steps 4]

Per row count: the median step time of each engine (every step of `--steps`-step Lightning-4 requests, `rows`
one-image requests batched in one forward), the compiled/eager ratio, and the largest latent difference between
the two. Also: the compile time (start-up, warm-up steps included), how many graphs dynamo built and how many
graph breaks it met (the LoRA routing runs inside the compiled block). Prints a table and writes
benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lightray.config import EngineConfig, load_preset  # noqa: E402
from lightray.contracts import DenoiseParams, TextEmbeddings  # noqa: E402
from lightray.engine.engine import DenoiseEngine  # noqa: E402

VARIANT = "lightray-shapes-lightning-4"


def step_times(engine: DenoiseEngine, text: TextEmbeddings, rows: int, size: int, steps: int
               ) -> tuple[list[float], np.ndarray]:
    """Each step's seconds for `rows` one-image requests denoised together, and their latents."""
    requests = [engine.submit(DenoiseParams(seeds=(i,), width=size, height=size, num_inference_steps=steps,
                                            variant=VARIANT), text) for i in range(rows)]
    times = []
    while not all(r.done() for r in requests):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times, np.stack([r.result() for r in requests])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="requests per engine and row count")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/compile.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import torch._dynamo.utils as dynamo_utils

    preset = load_preset("lightray-shapes")
    eager = DenoiseEngine(preset)
    start = time.perf_counter()
    compiled = DenoiseEngine(preset, EngineConfig(compile=True))
    startup_s = time.perf_counter() - start
    graphs_at_start = dynamo_utils.counters["stats"]["unique_graphs"]
    text = TextEmbeddings(prompt=np.random.RandomState(0).randn(12, eager.text_width).astype(np.float32))
    rows_out = []
    for rows in args.rows:
        times = {"eager": [], "compiled": []}
        diff = 0.0
        for _ in range(args.repeats):
            for name, engine in (("eager", eager), ("compiled", compiled)):
                t, latents = step_times(engine, text, rows, args.size, args.steps)
                times[name] += t
                if name == "eager":
                    reference = latents
                else:
                    diff = max(diff, float(np.abs(latents - reference).max()))
        row = {"rows": rows, "eager_step_s": statistics.median(times["eager"]),
               "compiled_step_s": statistics.median(times["compiled"]), "max_latent_diff": diff}
        row["compiled_over_eager"] = row["compiled_step_s"] / row["eager_step_s"]
        rows_out.append(row)
        print(f"{rows} rows: eager {row['eager_step_s'] * 1000:.1f} ms, compiled {row['compiled_step_s'] * 1000:.1f} "
              f"ms ({row['compiled_over_eager']:.2f}x), max latent diff {diff:.2e}", flush=True)
    # Prompts of different lengths in one batch: padded, masked text, which the row-wise attention processor
    # splits by length with a `.tolist()` (a graph break inside the block).
    graphs_before, breaks_before = (dynamo_utils.counters["stats"]["unique_graphs"],
                                    sum(dynamo_utils.counters["graph_break"].values()))
    short = TextEmbeddings(prompt=text.prompt[:5])
    mixed = {}
    for name, engine in (("eager", eager), ("compiled", compiled)):
        times = []
        for _ in range(args.repeats):
            requests = [engine.submit(DenoiseParams(seeds=(i,), width=args.size, height=args.size,
                                                    num_inference_steps=args.steps, variant=VARIANT),
                                      text if i % 2 else short) for i in range(4)]
            while not all(r.done() for r in requests):
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
        mixed[f"{name}_step_s"] = statistics.median(times)
    mixed.update(rows=4, new_graphs=dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before,
                 graph_breaks=sum(dynamo_utils.counters["graph_break"].values()) - breaks_before)
    print(f"4 rows, two prompt lengths: eager {mixed['eager_step_s'] * 1000:.1f} ms, compiled "
          f"{mixed['compiled_step_s'] * 1000:.1f} ms, {mixed['new_graphs']} new graphs, {mixed['graph_breaks']} "
          "graph breaks", flush=True)
    result = {
        "mixed_prompt_lengths": mixed,
        "size": args.size, "steps": args.steps, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "compile_startup_s": startup_s, "compile_s": compiled.compile_s,
        "unique_graphs_at_start": graphs_at_start,
        "unique_graphs_after": dynamo_utils.counters["stats"]["unique_graphs"],
        "graph_breaks": dict(dynamo_utils.counters["graph_break"]),
        "rows": rows_out,
    }
    print(f"compile at start: {compiled.compile_s:.1f} s; graphs {graphs_at_start} at start, "
          f"{result['unique_graphs_after']} after; graph breaks {result['graph_breaks'] or 'none'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

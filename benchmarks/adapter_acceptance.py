"""Adapter acceptance through the HTTP API of a real running service: the fixed prompt set with and without the
adapter, every image read back by the world's evaluator.

    python benchmarks/adapter_acceptance.py --adapter demo/frame --registry "$PWD/registry"   # starts a cluster
    python benchmarks/adapter_acceptance.py --adapter demo/frame --url http://127.0.0.1:8000  # a running service

Without `--url` it starts a private local Ray cluster (free ports, its own temp dir), `serve deploy`s
configs/serve/local.yaml with `registry` pointed at `--registry`, and stops that cluster at the end.

Prompts (`lightray.world.adapter_eval.acceptance_prompts`, fixed): `--prompts` concept prompts with the trigger word
(canonical phrasing, alternating EN/ZH) and `--prior-prompts` base-shape prompts without it (leakage: does the
adapter change prompts that do not ask for the concept?). Each is sent once per variant and per with/without,
with `seeds` (one image per seed) over `POST /v1/images/generations`. Prints a table, writes the numbers as
JSON and a before/after figure (first seed, first rows of the concept prompts).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

from lightray.world.adapter_eval import acceptance_prompts, before_after_figure, rates  # noqa: E402
from lightray.world.evaluator import parse_prompt  # noqa: E402

VARIANTS = ["lightray-shapes-lightning-4", "lightray-shapes-lightning-8", "lightray-shapes"]


def generate(url: str, prompt: str, model: str, seeds: list[int], lora: str | None, size: str) -> list[Image.Image]:
    body = {"prompt": prompt, "model": model, "size": size, "seeds": seeds, "n": len(seeds),
            "response_format": "b64_json", **({"lora": lora} if lora else {})}
    for attempt in range(5):
        r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
        if r.status_code != 503:  # overload: the ingress says when to come back
            break
        time.sleep(float(r.headers.get("retry-after", 1)))
    r.raise_for_status()
    return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB") for d in r.json()["data"]]


def measure(url: str, adapter: str, concept: str, prompts: list[str], seeds: list[int], variants: list[str],
            concurrency: int, size: str) -> dict:
    """{variant: {"without"|"with": rates + images}} for `prompts`, over HTTP."""
    expected = [parse_prompt(p) for p in prompts]
    jobs = [(v, label, i) for v in variants for label in ("without", "with") for i in range(len(prompts))]
    with cf.ThreadPoolExecutor(concurrency) as pool:
        futures = {job: pool.submit(generate, url, prompts[job[2]], job[0], seeds,
                                    adapter if job[1] == "with" else None, size) for job in jobs}
        images = {job: f.result() for job, f in futures.items()}
    out: dict = {}
    for v in variants:
        for label in ("without", "with"):
            per_prompt = [images[(v, label, i)] for i in range(len(prompts))]
            flat = [im for ims in per_prompt for im in ims]
            out.setdefault(v, {})[label] = {**rates(concept, flat, [sc for sc in expected for _ in seeds]),
                                            "images": per_prompt}
    return out


def strip(results: dict) -> dict:
    return {v: {k: {m: x for m, x in r.items() if m != "images"} for k, r in per.items()}
            for v, per in results.items()}


def table(concept_res: dict, prior_res: dict, concept: str) -> str:
    lines = [f"| model variant | LoRA | {concept}, trigger prompts | all attributes, trigger prompts | "
             f"{concept}, prompts without trigger (leak) | all attributes, prompts without trigger |",
             "| --- | --- | --- | --- | --- | --- |"]
    for v, per in concept_res.items():
        for label in ("without", "with"):
            c, p = per[label], prior_res[v][label]
            frac = lambda r, k: f"{100 * r[k]:.1f} % ({round(r[k] * r['n'])}/{r['n']})"  # noqa: E731
            lines.append(f"| `{v}` | {label} | {frac(c, 'concept_rate')} | {frac(c, 'all_rate')} | "
                         f"{frac(p, 'concept_rate')} | {frac(p, 'all_rate')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the `lora` value, e.g. demo/frame or demo/frame@v1")
    parser.add_argument("--concept", default="frame", help="what the adapter teaches: 'frame' (style) or 'ring'")
    parser.add_argument("--trigger", default="lrzframe")
    parser.add_argument("--url", default=None, help="a running service; default: start a private cluster")
    parser.add_argument("--registry", default=str(REPO / "registry"), help="registry the started service reads")
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--prior-prompts", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", nargs="+", default=["128x128"],
                        help='"WxH" sizes to measure at, each a served size (the figure shows the first)')
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/adapter_acceptance.json"))
    parser.add_argument("--figure", default=str(REPO / "docs/img/adapter_before_after.png"))
    args = parser.parse_args(argv)

    prompts, prior = acceptance_prompts(args.concept, args.trigger, args.prompts, args.prior_prompts)
    cluster = None
    url = args.url
    try:
        if url is None:
            from testing.local_cluster import RayCluster

            cluster = RayCluster().start()
            registry = str(Path(args.registry).resolve()) if "://" not in args.registry else args.registry
            cluster.deploy(cluster.serve_config(REPO / "configs/serve/local.yaml", {"registry": registry}))
            url = cluster.http_url
        by_size = {}
        for size in args.sizes:
            t0 = time.time()
            concept_res = measure(url, args.adapter, args.concept, prompts, args.seeds, args.variants,
                                  args.concurrency, size)
            prior_res = measure(url, args.adapter, args.concept, prior, args.seeds, args.variants,
                                args.concurrency, size)
            by_size[size] = (concept_res, prior_res, time.time() - t0)
    finally:
        if cluster is not None:
            cluster.stop()

    for size, (concept_res, prior_res, seconds) in by_size.items():
        print(f"\n### {size}\n")
        print(table(concept_res, prior_res, args.concept))
        print(f"\n{len(prompts)} trigger prompts + {len(prior)} prompts without the trigger × seeds {args.seeds}, "
              f"at {size}, over HTTP, {seconds:.0f} s")
    summary = {"adapter": args.adapter, "concept": args.concept, "trigger": args.trigger, "seeds": args.seeds,
               "via": "HTTP POST /v1/images/generations", "concept_prompts": prompts, "prior_prompts": prior,
               "sizes": {size: {"seconds": round(seconds, 1), "concept": strip(c), "prior": strip(p)}
                         for size, (c, p, seconds) in by_size.items()}}
    concept_res = by_size[args.sizes[0]][0]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(f"numbers: {args.json}")
    if args.figure:
        before_after_figure(concept_res, prompts, Path(args.figure))
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

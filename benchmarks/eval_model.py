"""Prompt adherence of the embedded model, read back by the pixel evaluator (no learned judge).

    python benchmarks/eval_model.py [--seeds 3] [--base-steps 20 50]

A fixed suite (seen and held-out attribute combinations, English and Chinese) is generated with:
  base + true CFG at each of --base-steps; base at 4 steps without CFG; Lightning 4 and 8 steps (CFG 1).
Prints per-attribute and overall adherence, EN vs ZH, held-out vs seen, and wall time per image; the speed-up
column is against the base + CFG row with the best adherence (the base "at its best step count"; on a tie, the
faster one). Writes docs/eval/results.json and a contact sheet docs/img/contact_sheet.png (prompt above each image).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent

from lightray.config import load_preset  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.schemas import GenerationSpec  # noqa: E402
from lightray.world.evaluator import ATTRIBUTES, parse_prompt, score  # noqa: E402
from lightray.world.shapes import HELD_OUT, Scene, training_scenes  # noqa: E402


def prompt_suite(seen: int = 16) -> list[dict]:
    """The canonical scene ("a red circle on the left, white background" / "白色背景，左边有一个红色的圆形"), every
    held-out combination and `seen` other training combinations, each in English and Chinese, with the
    canonical phrasing and one other phrasing."""
    rng = random.Random(1234)
    canonical = Scene("red", "circle", "left", "white")
    seen_scenes = [s for s in rng.sample(training_scenes(), seen + 1) if s != canonical][:seen]
    scenes = [canonical] + [Scene(*k) for k in sorted(HELD_OUT)] + seen_scenes
    suite = []
    for i, scene in enumerate(scenes):
        for language in ("en", "zh"):
            template = 0 if i % 2 == 0 else 1 + i % 3
            suite.append({
                "prompt": scene.caption(language, template), "language": language,
                "held_out": scene.key in HELD_OUT, "scene": scene,
            })
    return suite


def configurations(preset, base_steps: list[int]) -> list[dict]:
    base = preset.variant("lightray-shapes")
    return [
        *({"name": f"base {steps} steps, true CFG {base.true_cfg_scale:g}", "model": base.id, "base_cfg": True,
           "steps": steps, "cfg": base.true_cfg_scale, "negative": base.negative_prompt} for steps in base_steps),
        {"name": "base 4 steps, no CFG", "model": base.id, "steps": 4, "cfg": 1.0, "negative": None},
        {"name": "Lightning 4 steps", "model": "lightray-shapes-lightning-4", "steps": 4, "cfg": 1.0, "negative": None},
        {"name": "Lightning 8 steps", "model": "lightray-shapes-lightning-8", "steps": 8, "cfg": 1.0, "negative": None},
    ]


def evaluate(pipe: LocalPipeline, config: dict, suite: list[dict], seeds: int) -> tuple[dict, list]:
    rows, samples, times = [], [], []
    for k, item in enumerate(suite):
        for s in range(seeds):
            spec = GenerationSpec(
                prompt=item["prompt"], model=config["model"], seeds=[1000 * s + k], width=64, height=64,
                num_inference_steps=config["steps"], true_cfg_scale=config["cfg"], negative_prompt=config["negative"],
            )
            t0 = time.perf_counter()
            image = pipe.generate(spec)[0]
            times.append(time.perf_counter() - t0)
            result = score(image, parse_prompt(item["prompt"]))
            rows.append({**result, "language": item["language"], "held_out": item["held_out"]})
            if s == 0:
                samples.append((item["prompt"], image, result["all"]))

    def rate(subset, key="all"):
        return 100.0 * sum(r[key] for r in subset) / max(1, len(subset))

    summary = {
        "images": len(rows),
        "overall": rate(rows),
        "per_attribute": {a: rate(rows, a) for a in ATTRIBUTES},
        "english": rate([r for r in rows if r["language"] == "en"]),
        "chinese": rate([r for r in rows if r["language"] == "zh"]),
        "held_out": rate([r for r in rows if r["held_out"]]),
        "seen": rate([r for r in rows if not r["held_out"]]),
        "seconds_per_image_median": statistics.median(times),
    }
    return summary, samples


def contact_sheet(columns: list[tuple[str, list]], path: Path, count: int = 12) -> None:
    cell, label_h, head_h = 128, 30, 22
    width, height = cell * count, (head_h + cell + label_h) * len(columns)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for name, samples in columns:
        draw.text((4, y + 4), name, fill="black")
        y += head_h
        for i, (prompt, image, ok) in enumerate(samples[:count]):
            x = i * cell
            # PIL's built-in font has no CJK glyphs: Chinese prompts are labelled by their parsed attributes.
            label = prompt if prompt.isascii() else "[zh] " + " ".join(
                getattr(parse_prompt(prompt), a) for a in ("color", "shape", "position", "background"))
            draw.text((x + 2, y + 1), label[:22], fill="black")
            draw.text((x + 2, y + 13), label[22:44], fill="black")
            sheet.paste(image.resize((cell - 4, cell - 4), Image.Resampling.NEAREST), (x + 2, y + label_h))
            draw.rectangle([x + 1, y + label_h - 1, x + cell - 2, y + label_h + cell - 4],
                           outline=(0, 160, 0) if ok else (200, 0, 0), width=2)
        y += cell + label_h - 4
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lightray-shapes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--base-steps", type=int, nargs="+", default=[20, 50],
                        help="step counts for the base with true CFG (each is a row)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs/eval/results.json")
    parser.add_argument("--sheet", type=Path, default=REPO / "docs/img/contact_sheet.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_preset(args.preset)
    pipe = LocalPipeline(preset)
    suite = prompt_suite()
    results, columns, base_rows = {}, [], []
    for config in configurations(preset, args.base_steps):
        summary, samples = evaluate(pipe, config, suite, args.seeds)
        results[config["name"]] = summary
        columns.append((config["name"], samples))
        if config.get("base_cfg"):
            base_rows.append(config["name"])
        print(f"{config['name']}: overall {summary['overall']:.1f}%  ({summary['seconds_per_image_median']:.3f} s/img)",
              flush=True)
    base_name = max(base_rows, key=lambda n: (results[n]["overall"], -results[n]["seconds_per_image_median"]))
    base_time = results[base_name]["seconds_per_image_median"]
    print(f"\nsuite: {len(suite)} prompts x {args.seeds} seeds, 64x64, torch threads {args.threads}; "
          f"speed-up against {base_name!r} (the best base + CFG row)")
    # A markdown table: the model card's evaluation table is this output.
    header = ["configuration", "overall", *ATTRIBUTES, "EN", "ZH", "held-out", "seen", "s / image", "speed-up"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for name, s in results.items():
        cells = [name, f"{s['overall']:.1f} %", *(f"{s['per_attribute'][a]:.0f}" for a in ATTRIBUTES),
                 f"{s['english']:.1f}", f"{s['chinese']:.1f}", f"{s['held_out']:.1f}", f"{s['seen']:.1f}",
                 f"{s['seconds_per_image_median']:.3f}", f"{base_time / s['seconds_per_image_median']:.1f}×"]
        print("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"suite_size": len(suite), "seeds": args.seeds, "threads": args.threads,
                                    "speed_up_against": base_name, "results": results}, indent=2))
    contact_sheet(columns, args.sheet)
    print(f"wrote {args.out} and {args.sheet}")


if __name__ == "__main__":
    main()

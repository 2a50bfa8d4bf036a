"""Prompt adherence of the embedded model at every served size, read back by the pixel evaluator (no learned judge).

    python benchmarks/eval_model.py                      # every served size, 3 seeds (about 20 min on 2 cores)
    python benchmarks/eval_model.py --sizes 128x128 --seeds 1

A fixed suite of seen and held-out attribute combinations, in English and Chinese, is generated at each size with
the three served variants as an API request gets them: the base at 20 steps with true CFG, Lightning 4 and
Lightning 8 (CFG 1). The default size gets the full suite (the canonical scene, all 8 held-out combinations and 16
seen ones: 50 prompts); every other size gets a shorter one (the canonical scene, the 8 held-out and 7 seen: 32
prompts). Each prompt is generated once with all seeds as one request (n = seeds), the way a client asks for
several images. Wall time per image is the median of separate single-image runs (`--timed` prompts, one seed).

Prints a table by size x variant (overall, EN, ZH, held-out, seen, per attribute, s / image), the speed-up of
Lightning 4 over the base at the default size, and the issue's targets met or missed. Writes
docs/eval/results.json and one contact sheet per size, docs/img/contact_sheet_<W>x<H>.png (first seed; a green
border: all attributes right).
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
from lightray.world.datasets import width_height_argument  # noqa: E402
from lightray.world.evaluator import ATTRIBUTES, parse_prompt, score  # noqa: E402
from lightray.world.shapes import HELD_OUT, Scene, training_scenes  # noqa: E402

# (overall at the default size, overall at every other size) per variant, in %: the targets.
TARGETS = {"base 20 steps + CFG": (90.0, 85.0), "Lightning 4": (88.0, 82.0), "Lightning 8": (88.0, 82.0)}
ZH_WITHIN = 5.0


def prompt_suite(seen: int = 16) -> list[dict]:
    """The canonical scene ("a red circle on the left, white background" / "白色背景，左边有一个红色的圆形"), every
    held-out combination and `seen` other training combinations, each in English and Chinese, with the
    canonical phrasing and one other phrasing."""
    rng = random.Random(1234)
    canonical = Scene("red", "circle", "left", "white")
    seen_scenes = [s for s in rng.sample(training_scenes(), 17) if s != canonical][:seen]
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


def configurations(preset) -> list[dict]:
    base = preset.variant("lightray-shapes")
    return [
        {"name": "base 20 steps + CFG", "model": base.id, "steps": 20, "cfg": base.true_cfg_scale,
         "negative": base.negative_prompt},
        *({"name": f"Lightning {v.num_inference_steps}", "model": v.id, "steps": v.num_inference_steps,
           "cfg": v.true_cfg_scale, "negative": v.negative_prompt}
          for v in preset.variants if v.lightning_lora is not None),
    ]


def spec(config: dict, prompt: str, seeds: list[int], size: tuple[int, int]) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, model=config["model"], seeds=seeds, width=size[0], height=size[1],
                          num_inference_steps=config["steps"], true_cfg_scale=config["cfg"],
                          negative_prompt=config["negative"])


def evaluate(pipe: LocalPipeline, config: dict, suite: list[dict], seeds: int, size: tuple[int, int],
             timed: int) -> tuple[dict, list]:
    rows, samples = [], []
    for k, item in enumerate(suite):
        images = pipe.generate(spec(config, item["prompt"], [1000 * s + k for s in range(seeds)], size))
        expected = parse_prompt(item["prompt"])
        for s, image in enumerate(images):
            result = score(image, expected)
            rows.append({**result, "language": item["language"], "held_out": item["held_out"]})
            if s == 0:
                samples.append((item["prompt"], image, result["all"]))
    times = []
    for k, item in enumerate(suite[:timed]):
        t0 = time.perf_counter()
        pipe.generate(spec(config, item["prompt"], [k], size))
        times.append(time.perf_counter() - t0)

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
    first = columns[0][1][0][1]
    scale = 128 / max(first.size)
    cw, ch = round(first.width * scale), round(first.height * scale)
    cell_w, label_h, head_h = max(cw, 96) + 4, 30, 22
    sheet = Image.new("RGB", (cell_w * count, (head_h + ch + label_h) * len(columns)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for name, samples in columns:
        draw.text((4, y + 4), name, fill="black")
        y += head_h
        for i, (prompt, image, ok) in enumerate(samples[:count]):
            x = i * cell_w
            # PIL's built-in font has no CJK glyphs: Chinese prompts are labelled by their parsed attributes.
            label = prompt if prompt.isascii() else "[zh] " + " ".join(
                getattr(parse_prompt(prompt), a) for a in ("color", "shape", "position", "background"))
            chars = cell_w // 6
            draw.text((x + 2, y + 1), label[:chars], fill="black")
            draw.text((x + 2, y + 13), label[chars:2 * chars], fill="black")
            sheet.paste(image.resize((cw, ch), Image.Resampling.NEAREST), (x + 2, y + label_h))
            draw.rectangle([x + 1, y + label_h - 1, x + cw + 2, y + label_h + ch],
                           outline=(0, 160, 0) if ok else (200, 0, 0), width=2)
        y += ch + label_h
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def sizes_to_measure(values: list[tuple[int, int]] | None, preset) -> list[tuple[int, int]]:
    if not values:
        default = tuple(preset.default_size)
        return [default] + [tuple(s) for s in preset.sizes if tuple(s) != default]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="lightray-shapes")
    parser.add_argument("--sizes", nargs="+", type=width_height_argument, metavar="WxH", help='"WxH" sizes (default: every served size, the default first)')
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--timed", type=int, default=6, help="single-image runs per row for the wall time")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs/eval/results.json")
    parser.add_argument("--sheets", type=Path, default=REPO / "docs/img")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_preset(args.preset)
    pipe = LocalPipeline(preset)
    default = tuple(preset.default_size)
    full, short = prompt_suite(16), prompt_suite(7)
    results: dict[str, dict] = {}
    for size in sizes_to_measure(args.sizes, preset):
        name = f"{size[0]}x{size[1]}"
        suite = full if size == default else short
        columns, results[name] = [], {}
        for config in configurations(preset):
            t0 = time.time()
            summary, samples = evaluate(pipe, config, suite, args.seeds, size, args.timed)
            results[name][config["name"]] = summary
            columns.append((f"{name} · {config['name']}", samples))
            print(f"{name} {config['name']}: overall {summary['overall']:.1f}% EN {summary['english']:.1f} "
                  f"ZH {summary['chinese']:.1f} ({summary['seconds_per_image_median']:.3f} s/img; "
                  f"{time.time() - t0:.0f}s)", flush=True)
        contact_sheet(columns, args.sheets / f"contact_sheet_{name}.png")

    header = ["size", "variant", "overall", "EN", "ZH", "held-out", "seen", *ATTRIBUTES, "images", "s / image"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    missed = []
    for name, rows in results.items():
        is_default = name == f"{default[0]}x{default[1]}"
        for variant, s in rows.items():
            print("| " + " | ".join([
                f"**{name}**" if is_default else name, variant, f"{s['overall']:.1f} %", f"{s['english']:.1f}",
                f"{s['chinese']:.1f}", f"{s['held_out']:.1f}", f"{s['seen']:.1f}",
                *(f"{s['per_attribute'][a]:.0f}" for a in ATTRIBUTES), str(s["images"]),
                f"{s['seconds_per_image_median']:.3f}"]) + " |")
            target = TARGETS.get(variant, (None, None))[0 if is_default else 1]
            if target is not None and s["overall"] < target:
                missed.append(f"{name} {variant}: {s['overall']:.1f} % < {target:g} %")
            if variant.startswith("base") and s["english"] - s["chinese"] > ZH_WITHIN:
                missed.append(f"{name} {variant}: ZH {s['chinese']:.1f} more than {ZH_WITHIN:g} points below "
                              f"EN {s['english']:.1f}")
    speed_up = None
    default_name = f"{default[0]}x{default[1]}"
    if default_name in results and "Lightning 4" in results[default_name]:
        base_s = results[default_name]["base 20 steps + CFG"]["seconds_per_image_median"]
        speed_up = base_s / results[default_name]["Lightning 4"]["seconds_per_image_median"]
        print(f"\nLightning 4 over the base (20 steps + CFG) at {default_name}: {speed_up:.1f}x less wall time per image")
    print(f"suites: {len(full)} prompts at {default_name}, {len(short)} at the other sizes; {args.seeds} seeds; "
          f"torch threads {args.threads}")
    print("targets: " + ("all met" if not missed else "missed: " + "; ".join(missed)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "suite_sizes": {"default": len(full), "other": len(short)}, "seeds": args.seeds, "threads": args.threads,
        "default_size": default_name, "lightning4_speed_up_at_default": speed_up, "targets_missed": missed,
        "results": results}, indent=2) + "\n")
    print(f"wrote {args.out} and {args.sheets}/contact_sheet_<size>.png")


if __name__ == "__main__":
    main()

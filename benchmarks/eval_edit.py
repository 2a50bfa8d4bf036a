"""How well the embedded edit model (`lightray-shapes-edit`) follows instructions, read back by the pixel evaluator.

    python benchmarks/eval_edit.py                          # 128², 192x128; 3 seeds; both variants it serves
    python benchmarks/eval_edit.py --transformer PATH       # a checkpoint's transformer instead of the shipped one

Held-out scenes (the combinations no training pair starts from or ends at, `lightray.world.shapes.HELD_OUT`) are
edited by a fixed suite of single and two-attribute instructions in English and Chinese (the canonical grammar), at
each size, with each served variant as an API request gets it. Sources come from the world's renderer (augmented
as in training) and from a second renderer never seen in training (`render_foreign`). An edit is correct when
every attribute reads as the target's: the asked ones changed, the others kept (`lightray.world.edit_eval`).

Prints a table by variant × size × renderer (overall, EN, ZH, by kind of edit, untouched-background PSNR, s /
image), checks the issue's targets, writes docs/eval/edit_results.json and contact sheets
docs/img/edit_sheet_<variant>_<W>x<H>.png (source, instruction, result; a green border: correct).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent

from lightray.config import load_preset  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.schemas import ImageEditRequest  # noqa: E402
from lightray.world.edit_eval import score_edit  # noqa: E402
from lightray.world.edit_pairs import draw_source_jitter, render_foreign, render_source, sample_pairs  # noqa: E402

TARGETS = {"base": (85.0, 80.0), "lightning-4": (80.0, 75.0)}
"""Per variant kind: (correct % on the world's renderer, on the foreign renderer)."""
ZH_WITHIN = 5.0
SIZES = ((128, 128), (192, 128))


def variant_kind(model_id: str) -> str:
    return "lightning-4" if model_id.endswith("lightning-4") else "base"


def load(transformer: Path | None) -> LocalPipeline:
    preset = load_preset("lightray-shapes-edit")
    if transformer is not None:
        folder = Path(tempfile.mkdtemp(prefix="edit-eval-"))
        for part in preset.root.iterdir():
            (folder / part.name).symlink_to(transformer if part.name == "transformer" else part)
        preset = preset.model_copy(update={"path": str(folder)})
        preset.__dict__.pop("root", None)
    return LocalPipeline(preset)


def evaluate(pipe: LocalPipeline, model: str, size: tuple[int, int], pairs, seeds: int, renderer: str,
             sheet: list | None = None) -> list[dict]:
    rows = []
    for k, pair in enumerate(pairs):
        rng = random.Random(k)
        jitter = draw_source_jitter(rng)
        source = (render_source(pair.source, size, jitter, rng) if renderer == "world"
                  else render_foreign(pair.source, size, rng))
        body = ImageEditRequest(prompt=pair.instruction, model=model, seeds=list(range(seeds)), n=seeds,
                                size=f"{size[0]}x{size[1]}")
        spec = body.resolve_instruction(pipe.preset, 0, [source.size])
        t0 = time.perf_counter()
        results = pipe.instruct(spec, [source])
        seconds = (time.perf_counter() - t0) / seeds
        for seed, result in enumerate(results):
            # The foreign renderer places the shape at its own offset: its background is not the world's.
            s = score_edit(result, pair, jitter)
            rows.append({"kinds": "+".join(pair.kinds), "language": pair.language, "correct": s.correct,
                         "attributes": s.attributes, "seed": seed,
                         "background_psnr": s.background_psnr if renderer == "world" else None,
                         "seconds": seconds})
            if sheet is not None and seed == 0:
                sheet.append((source, pair.instruction, result, s.correct))
    return rows


def summary(rows: list[dict]) -> dict:
    def rate(subset) -> float | None:
        return round(100 * sum(r["correct"] for r in subset) / len(subset), 1) if subset else None

    kinds = sorted({r["kinds"] for r in rows})
    psnrs = [r["background_psnr"] for r in rows if r["background_psnr"] is not None]
    return {"images": len(rows), "correct": rate(rows), "en": rate([r for r in rows if r["language"] == "en"]),
            "zh": rate([r for r in rows if r["language"] == "zh"]),
            "by_kind": {k: rate([r for r in rows if r["kinds"] == k]) for k in kinds},
            "background_psnr_db": round(statistics.median(psnrs), 1) if psnrs else None,
            "s_per_image": round(statistics.median(r["seconds"] for r in rows), 3)}


CJK_FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
"""Debian's fonts-wqy-zenhei (installed with the browser for the tests): Chinese captions instead of boxes."""


def caption_font(size: int = 12):
    from PIL import ImageFont

    return ImageFont.truetype(str(CJK_FONT), size) if CJK_FONT.exists() else ImageFont.load_default()


EXAMPLE_INSTRUCTIONS = ("make the circle blue", "把圆形变成蓝色", "move the circle to the right",
                        "make the background black")


def example_figure(pipe: LocalPipeline, model: str, path: Path, seed: int = 3) -> None:
    """The README's before/after: the canonical scene and each of `EXAMPLE_INSTRUCTIONS` applied to it."""
    from lightray.world.shapes import Scene, render

    source = render(Scene("red", "circle", "left", "white"), 128)
    cells = [("input", source)]
    for text in EXAMPLE_INSTRUCTIONS:
        spec = ImageEditRequest(prompt=text, model=model, seed=seed).resolve_instruction(pipe.preset, 0, [source.size])
        cells.append((text, pipe.instruct(spec, [source])[0]))
    font = caption_font(11)
    figure = Image.new("RGB", (len(cells) * 136, 128 + 22), "white")
    draw = ImageDraw.Draw(figure)
    for i, (text, image) in enumerate(cells):
        figure.paste(image, (i * 136, 0))
        draw.text((i * 136 + 2, 131), text, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)


def contact_sheet(items: list, path: Path, columns: int = 4) -> None:
    cell_w, cell_h, text_h = 2 * items[0][0].width + 12, items[0][0].height, 28
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = caption_font()
    for i, (source, instruction, result, correct) in enumerate(items):
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + text_h)
        sheet.paste(source, (x, y))
        sheet.paste(result.convert("RGB"), (x + source.width + 4, y))
        draw.rectangle([x + source.width + 3, y, x + 2 * source.width + 4, y + cell_h - 1],
                       outline=(0, 170, 0) if correct else (200, 0, 0), width=2)
        draw.text((x + 2, y + cell_h + 2), instruction[:40], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=48, help="held-out edit pairs per size and renderer")
    parser.add_argument("--transformer", type=Path, default=None)
    parser.add_argument("--models", nargs="+", default=None, help="model ids (default: every served variant)")
    parser.add_argument("--sizes", nargs="+", default=None, help='e.g. "128x128"')
    parser.add_argument("--out", type=Path, default=REPO / "docs/eval/edit_results.json")
    parser.add_argument("--example", action="store_true",
                        help="only write the README's before/after figure, docs/img/edit_example.png")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = load(args.transformer)
    if args.example:
        example_figure(pipe, (args.models or pipe.preset.model_ids)[0], REPO / "docs/img/edit_example.png")
        return
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes] if args.sizes else list(SIZES)
    pairs = sample_pairs(args.pairs, seed=4321, held_out=True, phrasings=False)
    results: dict = {}
    print("| model | size | renderer | correct % | EN | ZH | colour | shape | position | background | two | bg PSNR "
          "| s/img |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models or pipe.preset.model_ids:
        for size in sizes:
            for renderer in ("world", "foreign"):
                sheet: list = []
                rows = evaluate(pipe, model, size, pairs, args.seeds, renderer, sheet)
                s = summary(rows)
                results[f"{model} {size[0]}x{size[1]} {renderer}"] = s
                k = s["by_kind"]
                two = [v for key, v in k.items() if "+" in key]
                print(f"| {model} | {size[0]}x{size[1]} | {renderer} | {s['correct']} | {s['en']} | {s['zh']} | "
                      f"{k.get('color')} | {k.get('shape')} | {k.get('position')} | {k.get('background')} | "
                      f"{round(statistics.mean(two), 1) if two else None} | {s['background_psnr_db']} | "
                      f"{s['s_per_image']} |", flush=True)
                contact_sheet(sheet[:16], REPO / f"docs/img/edit_sheet_{variant_kind(model)}_{renderer}_"
                                                 f"{size[0]}x{size[1]}.png")
    met = {}
    for key, s in results.items():
        model, _, renderer = key.split(" ")
        world, foreign = TARGETS[variant_kind(model)]
        target = world if renderer == "world" else foreign
        met[key] = {"target": target, "met": s["correct"] >= target,
                    "zh_within": abs((s["en"] or 0) - (s["zh"] or 0)) <= ZH_WITHIN}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "targets": met, "seeds": args.seeds, "pairs": args.pairs},
                                   indent=2) + "\n")
    for key, m in met.items():
        print(f"{key}: {'met' if m['met'] else 'MISSED'} (target {m['target']} %), ZH within {ZH_WITHIN}: "
              f"{'yes' if m['zh_within'] else 'NO'}")


if __name__ == "__main__":
    main()

"""img2img strength sweep and an inpainting example on the embedded model.

    python benchmarks/img2img_strength.py [--preset lightray-shapes] [--seeds 4] [--only sweep|inpaint]

For one input picture (a red circle on the left, white background) and two prompts, one changing only the colour
(a blue circle on the left) and one changing colour and place (a blue circle on the right), runs
img2img at strengths 0.1 … 1.0 with each Lightning variant and measures, over a few seeds: adherence to the prompt
(the shapes-world evaluator, all four attributes right), how often the input is still what the evaluator reads,
and PSNR to the input. Writes docs/img/img2img_strength.png (a strip per prompt and variant, seed 0),
docs/img/img2img_strength.json, and docs/img/inpaint_example.png (input, mask, results) with its metrics (pixels
outside the mask, with and without the `keep_unmasked` overlay; evaluator inside). `--only` reruns one part and
keeps the other's numbers from the JSON already there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parent.parent

from lightray.config import DEFAULT_PRESET, load_preset  # noqa: E402
from lightray.edits import overlay_mask  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.contracts import denoising_steps  # noqa: E402
from lightray.schemas import ImageEditRequest  # noqa: E402
from lightray.world.evaluator import parse_prompt, score  # noqa: E402
from lightray.world.shapes import Scene, render  # noqa: E402

SOURCE = Scene("red", "circle", "left", "white")
PROMPTS = {  # a change of colour only (keep the composition), and of colour and place
    "recolour": "a blue circle on the left, white background",
    "recompose": "a blue circle on the right, white background",
}
# Scenes the embedded model draws reliably from text (4 of 4 seeds); it is weak at squares.
INPAINT_PROMPT = "a green triangle on the left, white background"
STRENGTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
TILE = 128


def psnr(a: Image.Image, b: Image.Image, where: np.ndarray | None = None) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if where is not None:
        x, y = x[where], y[where]
    mse = float(np.mean((x - y) ** 2))
    return 99.0 if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def tile(image: Image.Image, label: str) -> Image.Image:
    out = Image.new("RGB", (TILE, TILE + 14), (255, 255, 255))
    out.paste(image.resize((TILE, TILE), Image.Resampling.NEAREST), (0, 0))
    ImageDraw.Draw(out).text((3, TILE + 1), label, fill=(0, 0, 0))
    return out


def strip(rows: list[list[Image.Image]]) -> Image.Image:
    w = max(len(r) for r in rows) * (TILE + 4)
    h = len(rows) * (TILE + 18)
    out = Image.new("RGB", (w, h), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            out.paste(im, (j * (TILE + 4), i * (TILE + 18)))
    return out


def sweep(pipe: LocalPipeline, seeds: list[int], out_dir: Path) -> list[dict]:
    """The strength sweep's rows; writes img2img_strength.png (seed 0 of every cell)."""
    preset = pipe.preset
    source = render(SOURCE, 64)
    variants = [v.id for v in preset.variants if v.lightning_lora] or [preset.variants[0].id]
    rows, strip_rows = [], []
    for (task, prompt), model in [(tp, m) for tp in PROMPTS.items() for m in variants]:
        expected = parse_prompt(prompt)
        strip_row = [tile(source, f"{task}, {preset.variant(model).num_inference_steps} steps")]
        for strength in STRENGTHS:
            spec = ImageEditRequest(prompt=prompt, model=model, n=len(seeds), seeds=seeds, strength=strength).resolve(
                preset, 0, source.size)
            outs = pipe.edit(spec, source)
            scores = [score(o, expected) for o in outs]
            row = {
                "task": task, "prompt": prompt, "model": model, "strength": strength,
                "steps": denoising_steps(spec.num_inference_steps, strength),
                "of_steps": spec.num_inference_steps,
                "prompt_adherence": statistics.mean(s["all"] for s in scores),
                "per_attribute": {a: statistics.mean(s[a] for s in scores) for a in ("color", "shape", "position")},
                "input_kept": statistics.mean(score(o, SOURCE)["all"] for o in outs),
                "psnr_to_input_db": statistics.mean(psnr(o, source) for o in outs),
            }
            rows.append(row)
            strip_row.append(tile(outs[0], f"s={strength:.1f} {row['steps']}/{row['of_steps']}"))
        strip_rows.append(strip_row)
    strip(strip_rows).save(out_dir / "img2img_strength.png")
    return rows


def inpaint_example(pipe: LocalPipeline, seeds: list[int], out_dir: Path) -> dict:
    """Inpainting: replace the circle (the left half) with the prompt's shape; the right half must not change.
    Measured with the `keep_unmasked` overlay (the default) and without it; writes inpaint_example.png."""
    preset = pipe.preset
    source = render(SOURCE, 64)
    model = preset.variants[0].id
    edit = Image.new("L", source.size, 0)
    edit.paste(255, (0, 0, 32, 64))
    outside = np.asarray(edit.filter(ImageFilter.MaxFilter(17))) == 0  # pixels ≥ 8 px away from the edit area
    kept = np.asarray(overlay_mask(edit, None)) == 0  # outside the overlay's soft edge
    spec = ImageEditRequest(prompt=INPAINT_PROMPT, model=model, n=len(seeds), seeds=seeds).resolve(
        preset, 0, source.size, inpaint=True)
    outs = pipe.edit(spec, source, edit)
    raw = pipe.edit(dataclasses.replace(spec, keep_unmasked=False), source, edit)
    recon = pipe.vae.decode(pipe.vae.encode([source]), 64, 64)[0]
    src = np.asarray(source, dtype=np.int16)
    inpaint = {
        "model": model, "prompt": INPAINT_PROMPT, "strength": spec.strength, "seeds": seeds,
        "prompt_adherence": statistics.mean(score(o, parse_prompt(INPAINT_PROMPT))["all"] for o in outs),
        "max_abs_diff_outside_soft_edge": [int(np.abs(np.asarray(o, dtype=np.int16) - src)[kept].max())
                                           for o in outs],
        "psnr_outside_mask_db": [round(psnr(o, source, outside), 2) for o in outs],
        "without_overlay": {
            "max_abs_diff_outside_soft_edge": [int(np.abs(np.asarray(o, dtype=np.int16) - src)[kept].max())
                                               for o in raw],
            "psnr_outside_soft_edge_db": [round(psnr(o, source, kept), 2) for o in raw],
            "psnr_outside_mask_db": [round(psnr(o, source, outside), 2) for o in raw],
            "psnr_outside_mask_vs_vae_reconstruction_db": [round(psnr(o, recon, outside), 2) for o in raw],
        },
        "vae_reconstruction_psnr_db": round(psnr(recon, source), 2),
    }
    overlay = source.copy()
    overlay.paste(Image.new("RGB", source.size, (255, 0, 255)), mask=edit.point(lambda v: 96 if v else 0))
    strip([[tile(source, "input"), tile(overlay, "mask"), *[tile(o, f"seed {s}") for o, s in zip(outs, seeds)]]]
          ).save(out_dir / "inpaint_example.png")
    return inpaint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out-dir", default=str(REPO / "docs/img"))
    parser.add_argument("--only", choices=["sweep", "inpaint"],
                        help="rerun one part; the other's numbers are kept from the existing JSON")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "img2img_strength.json"
    previous = json.loads(results_path.read_text()) if args.only and results_path.exists() else {}

    pipe = LocalPipeline(load_preset(args.preset))
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    rows = sweep(pipe, seeds, out_dir) if args.only != "inpaint" else previous["sweep"]
    inpaint = inpaint_example(pipe, seeds, out_dir) if args.only != "sweep" else previous["inpaint"]
    result = {"preset": pipe.preset.name, "input": SOURCE.caption(), "prompts": PROMPTS, "seeds": seeds,
              "image_encode_mode": pipe.preset.image_encode_mode, "sweep": rows, "inpaint": inpaint,
              "seconds": round(time.perf_counter() - t0, 1) if not args.only else previous["seconds"]}
    results_path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"input: {SOURCE.caption()}; {len(seeds)} seeds; " + "; ".join(f"{k}: {v}" for k, v in PROMPTS.items()))
    print(f"{'task':<10} {'model':<28} {'strength':>8} {'steps':>6} {'adherence':>9} {'kept':>5} {'PSNR→input':>10}")
    for r in rows:
        print(f"{r['task']:<10} {r['model']:<28} {r['strength']:>8.1f} {r['steps']:>3}/{r['of_steps']:<2} "
              f"{r['prompt_adherence']:>9.0%} {r['input_kept']:>5.0%} {r['psnr_to_input_db']:>9.1f}")
    print(f"inpainting ({inpaint['model']}, strength {inpaint['strength']}): adherence "
          f"{inpaint['prompt_adherence']:.0%}, max |difference| outside the overlay's soft edge "
          f"{inpaint['max_abs_diff_outside_soft_edge']} (without the overlay: "
          f"{inpaint['without_overlay']['max_abs_diff_outside_soft_edge']}; PSNR ≥ 8 px outside the mask "
          f"{inpaint['without_overlay']['psnr_outside_mask_db']} dB; VAE reconstruction alone: "
          f"{inpaint['vae_reconstruction_psnr_db']} dB)")


if __name__ == "__main__":
    main()

"""Where should image encoding (img2img / inpainting) run? Measures what decides it on the embedded model:

  * the VAE encode of one 64x64 input (what `VaeDecoder.encode` does per request), next to the text encode it
    runs concurrently with, the denoise it feeds, and the decode;
  * one Ray Serve handle hop (driver → replica → driver) carrying what the encode hop carries: a 64x64x3 uint8
    image in, [n, 16, 64] float32 latents (+ generator states) out.

    python benchmarks/vae_encode_hop.py [--runs 30] [--preset PATH]

Stage timings use 1 torch thread (what a Serve replica gets: Ray sets OMP_NUM_THREADS=1). Writes
docs/img/vae_encode_hop.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent

from lightray.config import DEFAULT_PRESET, load_preset  # noqa: E402
from lightray.pipeline import LocalPipeline  # noqa: E402
from lightray.contracts import denoising_steps  # noqa: E402
from lightray.schemas import ImageEditRequest  # noqa: E402
from lightray.world.shapes import Scene, render  # noqa: E402
from testing.timing import median_ms  # noqa: E402


def stage_timings(preset, runs: int) -> dict[str, float]:
    torch.set_num_threads(1)
    pipe = LocalPipeline(preset)
    image = render(Scene("red", "circle", "left", "white"), 64)
    spec = ImageEditRequest(prompt="a blue square on the right, white background", seed=1).resolve(
        pipe.preset, 0, image.size)
    text = pipe.encode(spec)
    start = pipe.vae.encode_for_seeds(image, spec.seeds, 64, 64)
    latents = pipe.denoiser.denoise(spec.denoise_params(), text, image=start)
    return {
        "vae_encode_ms": median_ms(lambda: pipe.vae.encode_for_seeds(image, spec.seeds, 64, 64), runs),
        "text_encode_ms": median_ms(lambda: pipe.text.encode(spec.prompts()), runs),
        "denoise_ms": median_ms(lambda: pipe.denoiser.denoise(spec.denoise_params(), text, image=start),
                                max(5, runs // 5)),
        "vae_decode_ms": median_ms(lambda: pipe.vae.decode(latents, 64, 64), runs),
        "denoise_steps": denoising_steps(spec.num_inference_steps, spec.strength),
        "of_steps": spec.num_inference_steps,
        "strength": spec.strength,
        "model": spec.model,
    }


def hop_timings(runs: int) -> dict[str, float]:
    import ray
    from ray import serve

    from testing.local_cluster import RayCluster, free_port

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Hop:
        def encode(self, image: np.ndarray, seeds: list[int]) -> dict:
            return {"latents": np.zeros((len(seeds), 16, 64), np.float32), "generator_states": None,
                    "timings": {}}

    cluster = RayCluster().start()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handle = serve.run(Hop.bind(), name="hop", route_prefix=None)
        image = np.zeros((64, 64, 3), np.uint8)
        one = median_ms(lambda: handle.encode.remote(image, [1]).result(), runs)
        four = median_ms(lambda: handle.encode.remote(image, [1, 2, 3, 4]).result(), runs)
        serve.shutdown()
        ray.shutdown()
    finally:
        cluster.stop()
    return {"hop_ms_n1": one, "hop_ms_n4": four}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", default=str(REPO / "docs/img/vae_encode_hop.json"))
    args = parser.parse_args()
    preset = load_preset(args.preset)
    result = {"preset": preset.name, "path": preset.path, **stage_timings(preset, args.runs)}
    if not args.no_ray:
        result.update(hop_timings(args.runs))
    for k, v in result.items():
        print(f"{k:>16}: {v:.2f}" if isinstance(v, float) else f"{k:>16}: {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

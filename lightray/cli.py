"""`lightray` command line: serve the graph, generate images (over HTTP or in-process), manage adapters.

    lightray serve [configs/serve/local.yaml]
    lightray generate "a red circle on the left, white background" -n 2 --seed 7 -o out/
    lightray generate "白色背景，左边有一个红色的圆形" --local -o out/
    lightray generate "lrzframe style, a blue square" --lora demo/frame:0.8 --lora acme/rings --priority batch
    lightray adapters list
    lightray train estimate configs/train/qwen-image.yaml [--json]
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lightray.adapters_cli import add_adapter_commands
from lightray.config import REPO_ROOT
from lightray.contracts import MAX_STACKED_ADAPTERS, PRIORITIES
from lightray.ray_env import with_ray_defaults
from lightray.training.cli import add_train_commands

DEFAULT_URL = os.environ.get("LIGHTRAY_URL", "http://127.0.0.1:8000")


def _serve_url(config: Path) -> str:
    import yaml

    http = yaml.safe_load(config.read_text()).get("http_options", {})
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"


def spawn_interruptible(cmd: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` whose child takes SIGINT as Ctrl-C even when this process was started in the
    background. A shell starts background jobs (`make serve &`, nohup) with SIGINT ignored, an ignored signal
    stays ignored across exec, and Python then never raises KeyboardInterrupt: `serve run` would ignore the
    SIGINT that `cmd_serve` forwards on SIGTERM, and the service would never stop."""
    return subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def cmd_serve(args: argparse.Namespace) -> int:
    config = Path(args.config)
    env = with_ray_defaults(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    serve_bin = Path(sys.executable).parent / "serve"
    child = spawn_interruptible([str(serve_bin), "run", str(config)], cwd=REPO_ROOT, env=env)

    # `serve run` shuts the app down on SIGINT but leaves it deployed on SIGTERM: forward both as SIGINT.
    def forward(signum, frame):
        child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    url = _serve_url(config)
    deadline = time.time() + args.ready_timeout
    announced = False
    while child.poll() is None:
        if not announced and time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    print(f"\nLightray is serving at {url}  (API docs: {url}/docs, models: {url}/v1/models)\n",
                          flush=True)
                    announced = True
            except httpx.HTTPError:
                pass
        time.sleep(1)
    return child.returncode or 0


def _save_images(images: list[tuple[int, bytes]], out: Path, prefix: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, png in images:
        path = out / f"{prefix}-seed{seed}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    body = {"prompt": args.prompt, "n": args.n, "response_format": "b64_json"}
    for key in ("model", "size", "seed", "negative_prompt", "num_inference_steps", "true_cfg_scale", "priority"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    if args.lora:  # one --lora as the API's single string, so its errors name `lora` as a request's would
        body["lora"] = args.lora[0] if len(args.lora) == 1 else args.lora
    if args.local:
        images = _generate_local(body, args.preset, args.registry)
    else:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        r = httpx.post(f"{args.url}/v1/images/generations", json=body, headers=headers, timeout=args.timeout)
        if r.status_code != 200:
            print(f"error {r.status_code}: {r.text}", file=sys.stderr)
            return 1
        images = [(d["seed"], base64.b64decode(d["b64_json"])) for d in r.json()["data"]]
    for path in _save_images(images, Path(args.out), args.prefix):
        print(path)
    return 0


def _generate_local(body: dict, preset: str, registry_root: str | None) -> list[tuple[int, bytes]]:
    import secrets

    from lightray.images import encode_png
    from lightray.pipeline import LocalPipeline
    from lightray.schemas import ImageGenerationRequest, lora_params

    pipeline = LocalPipeline(preset)
    request = ImageGenerationRequest.model_validate(body)
    spec = request.resolve(pipeline.preset, secrets.randbelow(2**31))
    if request.priority is not None:
        spec.priority = request.priority
    if spec.adapters:
        from lightray.adapters import fetch_for_preset, resolve_adapters
        from lightray.registry_settings import open_registry

        # As the ingress pins them (serve_app.routers.images.pin_adapters), with no tenancy: one local user.
        registry = open_registry(registry_root)
        resolved = resolve_adapters(registry, pipeline.preset, spec.adapters, lora_params(request.lora))
        spec.adapters = tuple(adapter.use for adapter in resolved)
        adapter_paths = {use.ref: str(fetch_for_preset(registry, use.ref, pipeline.preset)[1])
                         for use in spec.adapters}
    images = pipeline.generate(spec, adapter_paths if spec.adapters else None)
    return [(seed, encode_png(im)) for seed, im in zip(spec.seeds, images)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Serve application from a Serve YAML (Ctrl-C stops it)")
    serve.add_argument("config", nargs="?", default=str(REPO_ROOT / "configs/serve/local.yaml"))
    serve.add_argument("--ready-timeout", type=float, default=600)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate images and save them as PNGs")
    gen.add_argument("prompt")
    gen.add_argument("-n", type=int, default=1)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--model")
    gen.add_argument("--size")
    gen.add_argument("--negative-prompt", dest="negative_prompt")
    gen.add_argument("--steps", dest="num_inference_steps", type=int)
    gen.add_argument("--cfg", dest="true_cfg_scale", type=float)
    gen.add_argument("--lora", action="append",
                     help="tenant adapter, e.g. acme/rings or acme/rings@v2:0.8; repeat to stack up to "
                          f"{MAX_STACKED_ADAPTERS}, applied in the order given")
    gen.add_argument("--priority", choices=PRIORITIES,
                     help="scheduling class (default: the API key's; interactive with --local)")
    gen.add_argument("-o", "--out", default="out")
    gen.add_argument("--prefix", default="image")
    gen.add_argument("--url", default=DEFAULT_URL, help="service base URL (default %(default)s)")
    gen.add_argument("--api-key", default=os.environ.get("LIGHTRAY_API_KEY"),
                     help="API key when the service has auth on (default: $LIGHTRAY_API_KEY)")
    gen.add_argument("--timeout", type=float, default=300)
    gen.add_argument("--local", action="store_true", help="run the stages in this process instead of over HTTP")
    gen.add_argument("--preset", default="lightray-shapes", help="model preset for --local")
    gen.add_argument("--registry", default=None,
                     help="adapter registry for --local --lora (default: $LIGHTRAY_REGISTRY or ./registry; a "
                          "relative folder is taken from the repository root)")
    gen.set_defaults(func=cmd_generate)

    add_adapter_commands(sub)
    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

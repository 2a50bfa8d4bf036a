"""`lightray` command line: serve the graph, generate images (over HTTP or in-process), manage adapters.

    lightray serve [configs/serve/local.yaml]
    lightray generate "a red circle on the left, white background" -n 2 --seed 7 -o out/
    lightray generate "白色背景，左边有一个红色的圆形" --local -o out/
    lightray generate "lrzframe style, a blue square" --lora demo/frame:0.8 --lora acme/rings --priority batch
    lightray edit out/image-seed7.png "make the circle blue" --seed 3 -o out/
    lightray edit a.png b.png --prompt "把背景变成黑色" --local --size 128x128
    lightray adapters list
    lightray train estimate configs/train/qwen-image.yaml [--json]
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import mimetypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import ValidationError

from lightray.adapters_cli import add_adapter_commands
from lightray.config import REPO_ROOT
from lightray.contracts import MAX_STACKED_ADAPTERS, PRIORITIES
from lightray.ray_env import with_ray_defaults
from lightray.errors import RequestError
from lightray.training.cli import add_train_commands

DEFAULT_URL = os.environ.get("LIGHTRAY_URL", "http://127.0.0.1:8000")
DEFAULT_EDIT_PRESET = "lightray-shapes-edit"
"""The embedded instruction-edit model's preset (configs/models/lightray-shapes-edit.yaml): `lightray edit --local`."""
DEFAULT_EDIT_MODEL = "lightray-shapes-edit-lightning-4"
"""Its 4-step Lightning variant (the preset's default): what `lightray edit` asks the service for."""
REQUEST_OPTIONS = ("model", "size", "seed", "negative_prompt", "num_inference_steps", "true_cfg_scale", "priority")
"""The request fields that `generate` and `edit` share as options (`_add_request_options`)."""


def _http_bind(config: dict) -> tuple[str, int]:
    """(host, port) a Serve YAML's HTTP proxy binds to (Serve's defaults where it says nothing)."""
    http = config.get("http_options") or {}
    return str(http.get("host", "127.0.0.1")), int(http.get("port", 8000))


LOOPBACK_NAMES = ("localhost",)
"""Host names taken for loopback besides loopback addresses (127.0.0.0/8, ::1)."""


class UnsafeServeConfig(ValueError):
    """A Serve YAML `lightray serve` refuses to run."""


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the service on this machine: a loopback address or "localhost" (not
    0.0.0.0 or ::, which bind every interface)."""
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _auth_off(app: dict, environ: dict[str, str]) -> bool:
    """Whether an application of a Serve YAML runs with auth off, by the precedence `ServiceSettings` applies: its
    `args`, else `LIGHTRAY_AUTH_ENABLED` (the application's runtime_env, else this process's environment), else on.
    (lightray/ does not import serve_app, so the precedence is restated here; pydantic's false words.)"""
    value = (app.get("args") or {}).get("auth_enabled")
    if value is None:
        env_vars = (app.get("runtime_env") or {}).get("env_vars") or {}
        value = env_vars.get("LIGHTRAY_AUTH_ENABLED", environ.get("LIGHTRAY_AUTH_ENABLED"))
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip().lower() in ("0", "off", "f", "false", "n", "no")
    return value is False or value == 0


def check_serve_config(config: dict, environ: dict[str, str]) -> None:
    """Refuse (`UnsafeServeConfig`) a Serve YAML that runs an application with auth off on a bind that is not
    loopback: with no API keys, every caller that reaches the port is the local user (docs/security.md)."""
    host, _ = _http_bind(config)
    if is_loopback(host):
        return
    for app in config.get("applications") or []:
        if _auth_off(app, environ):
            raise UnsafeServeConfig(
                f"application {app.get('name', '?')!r} has auth_enabled off, which is only allowed on a loopback "
                f"bind, but http_options.host is {host!r}: bind to 127.0.0.1 or turn auth on with API keys "
                "(LIGHTRAY_API_KEYS)")


def spawn_interruptible(cmd: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` whose child takes SIGINT as Ctrl-C even when this process was started in the
    background. A shell starts background jobs (`make serve &`, nohup) with SIGINT ignored, an ignored signal
    stays ignored across exec, and Python then never raises KeyboardInterrupt: `serve run` would ignore the
    SIGINT that `cmd_serve` forwards on SIGTERM, and the service would never stop."""
    return subprocess.Popen(cmd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def cmd_serve(args: argparse.Namespace) -> int:
    import yaml

    config = Path(args.config)
    try:
        serve_config = yaml.safe_load(config.read_text()) or {}
        check_serve_config(serve_config, dict(os.environ))
    except (UnsafeServeConfig, OSError, yaml.YAMLError) as e:
        print(f"error: {config}: {e}", file=sys.stderr)
        return 2
    if not args.no_demo_adapters:
        _seed_demo_adapters(serve_config)
    env = with_ray_defaults(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    serve_bin = Path(sys.executable).parent / "serve"
    child = spawn_interruptible([str(serve_bin), "run", str(config)], cwd=REPO_ROOT, env=env)

    # `serve run` shuts the app down on SIGINT but leaves it deployed on SIGTERM: forward both as SIGINT.
    def forward(signum, frame):
        child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    host, port = _http_bind(serve_config)
    url = f"http://{host}:{port}"
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


def _seed_demo_adapters(serve_config: dict) -> None:
    """Publish the shipped demo adapters into the registry of every application of `serve_config` that serves the
    model they were trained on (`lightray.demo_adapters`; nothing already there is touched)."""
    from lightray.config import DEFAULT_PRESET, load_preset
    from lightray.demo_adapters import seed_registry
    from lightray.registry_settings import open_registry

    for app in serve_config.get("applications", []):
        args = app.get("args") or {}
        served = {load_preset(p).base_model_id for p in [args.get("preset", DEFAULT_PRESET),
                                                         *args.get("extra_presets", [])]}
        root = args.get("registry")
        registry = open_registry(str(REPO_ROOT / root) if root and "://" not in root else root,
                                 args.get("registry_storage_options"))
        for ref in seed_registry(registry, served):
            print(f"demo adapter {ref} published to the registry", flush=True)


def _save_images(images: list[tuple[int, bytes]], out: Path, prefix: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, png in images:
        path = out / f"{prefix}-seed{seed}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths


def _request_body(args: argparse.Namespace, prompt: str) -> dict:
    """The API request of `generate` / `edit`: the prompt and every shared option given (`REQUEST_OPTIONS`)."""
    body = {"prompt": prompt, "n": args.n, "response_format": "b64_json"}
    for key in REQUEST_OPTIONS:
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    return body


def _images_of(response: httpx.Response) -> list[tuple[int, bytes]] | None:
    """(seed, PNG) of every image in an images response; None, after printing the service's error, otherwise."""
    if response.status_code != 200:
        print(f"error {response.status_code}: {response.text}", file=sys.stderr)
        return None
    return [(d["seed"], base64.b64decode(d["b64_json"])) for d in response.json()["data"]]


def _auth_headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _print_local_error(e: RequestError | ValidationError) -> None:
    """A request refused in process, as the service's 400 would word it: the field, then what is wrong."""
    if isinstance(e, RequestError):
        message = e.message if e.message.startswith(e.param) else f"{e.param}: {e.message}"
    else:
        first = e.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        text = first["msg"].removeprefix("Value error, ")
        message = f"{field}: {text}" if field and not text.startswith(field) else text
    print(f"error: {message}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    body = _request_body(args, args.prompt)
    if args.lora:  # one --lora as the API's single string, so its errors name `lora` as a request's would
        body["lora"] = args.lora[0] if len(args.lora) == 1 else args.lora
    if args.local:
        try:
            images = _generate_local(body, args.preset, args.registry)
        except (RequestError, ValidationError) as e:
            _print_local_error(e)
            return 1
    else:
        images = _images_of(httpx.post(f"{args.url}/v1/images/generations", json=body, headers=_auth_headers(args),
                                       timeout=args.timeout))
        if images is None:
            return 1
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
    if spec.adapters:
        from lightray.adapters import fetch_for_preset, pin_adapters
        from lightray.registry_settings import open_registry

        # As the ingress pins them, with no tenancy: one local user.
        registry = open_registry(registry_root)
        spec = pin_adapters(spec, registry, pipeline.preset, lora_params(request.lora))
        adapter_paths = {use.key: str(fetch_for_preset(registry, use.ref, pipeline.preset)[1])
                         for use in spec.adapters}
    images = pipeline.generate(spec, adapter_paths if spec.adapters else None)
    return [(seed, encode_png(im)) for seed, im in zip(spec.seeds, images)]


def _edit_inputs(args: argparse.Namespace) -> tuple[list[Path], str]:
    """(pictures, instruction) from `edit`'s positional arguments: with --prompt all of them are pictures, without
    it the last one is the instruction. A mistake is a usage error naming it (exit status 2)."""
    inputs = list(args.inputs)
    if args.prompt is not None:
        instruction = args.prompt
    else:
        if len(inputs) < 2:
            args.usage_error("give the pictures, then the instruction (or the instruction with --prompt)")
        *inputs, instruction = inputs
        # `lightray edit a.png b.png` would otherwise send "b.png" as the instruction about a.png.
        if Path(instruction).is_file():
            args.usage_error(f"the last argument is the instruction, but {instruction!r} is a file: add the "
                             "instruction after the pictures, or give it with --prompt")
    missing = [name for name in inputs if not Path(name).is_file()]
    if missing:
        args.usage_error(f"no such picture: {', '.join(missing)}")
    return [Path(name) for name in inputs], instruction


def cmd_edit(args: argparse.Namespace) -> int:
    pictures, instruction = _edit_inputs(args)
    body = _request_body(args, instruction)
    if args.local:
        try:
            images = _edit_local(body, pictures, args.preset)
        except (RequestError, ValidationError) as e:
            _print_local_error(e)
            return 1
    else:
        body.setdefault("model", DEFAULT_EDIT_MODEL)  # without it the service would img2img with its default model
        # Multipart as OpenAI's clients send an edit: each picture an `image[]` part, in order; fields as text.
        files = [("image[]", (path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or "image/png"))
                 for path in pictures]
        images = _images_of(httpx.post(f"{args.url}/v1/images/edits", data={k: str(v) for k, v in body.items()},
                                       files=files, headers=_auth_headers(args), timeout=args.timeout))
        if images is None:
            return 1
    for path in _save_images(images, Path(args.out), args.prefix):
        print(path)
    return 0


def _edit_local(body: dict, pictures: list[Path], preset_name: str) -> list[tuple[int, bytes]]:
    """An instruction edit in this process, checked as the service checks it (`serve_app.routers.edits`) before
    the model is loaded: the fields, each picture (named by its path), the picture count and the output size."""
    import secrets

    from lightray.config import load_preset
    from lightray.images import encode_png, open_image, to_rgb
    from lightray.pipeline import LocalPipeline
    from lightray.schemas import ImageEditRequest

    preset = load_preset(preset_name)
    if not preset.model_family.condition_tokens:
        raise RequestError("preset", f"preset {preset.name!r} ({preset.model_family.name}) does not edit by "
                                     f"instruction; use an instruction-edit preset such as {DEFAULT_EDIT_PRESET!r}")
    request = ImageEditRequest.model_validate(body)
    images = [to_rgb(open_image(path.read_bytes(), str(path))) for path in pictures]
    spec = request.resolve_instruction(preset, secrets.randbelow(2**31), [im.size for im in images])
    outputs = LocalPipeline(preset).instruct(spec, images)
    return [(seed, encode_png(im)) for seed, im in zip(spec.seeds, outputs)]


def _add_request_options(parser: argparse.ArgumentParser, model_help: str, size_help: str) -> None:
    """The options `generate` and `edit` share: the request's fields (`REQUEST_OPTIONS`), where the images go, and
    how to reach the service or run in process."""
    parser.add_argument("-n", type=int, default=1)
    parser.add_argument("--seed", type=int, help="image i gets seed + i (default: random)")
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--size", help=size_help)
    parser.add_argument("--negative-prompt", dest="negative_prompt")
    parser.add_argument("--steps", dest="num_inference_steps", type=int, help="default: the model's")
    parser.add_argument("--cfg", dest="true_cfg_scale", type=float, help="true-CFG scale (default: the model's)")
    parser.add_argument("--priority", choices=PRIORITIES,
                        help="scheduling class (default: the API key's; interactive with --local)")
    parser.add_argument("-o", "--out", default="out", help="folder for the PNGs (default %(default)s)")
    parser.add_argument("--url", default=DEFAULT_URL, help="service base URL (default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("LIGHTRAY_API_KEY"),
                        help="API key when the service has auth on (default: $LIGHTRAY_API_KEY)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--local", action="store_true", help="run the stages in this process instead of over HTTP")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Serve application from a Serve YAML (Ctrl-C stops it)")
    serve.add_argument("config", nargs="?", default=str(REPO_ROOT / "configs/serve/local.yaml"))
    serve.add_argument("--ready-timeout", type=float, default=600)
    serve.add_argument("--no-demo-adapters", action="store_true",
                       help="do not publish the shipped demo adapters (demo/frame, demo/ring) into the registry")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate images and save them as PNGs")
    gen.add_argument("prompt")
    _add_request_options(gen, model_help="model id from GET /v1/models (default: the service's default model; "
                                         "with --local, the preset's first)",
                         size_help="WxH, one of the model's sizes (default: the model's default size)")
    gen.add_argument("--lora", action="append",
                     help="tenant adapter, e.g. acme/rings or acme/rings@v2:0.8; repeat to stack up to "
                          f"{MAX_STACKED_ADAPTERS}, applied in the order given")
    gen.add_argument("--prefix", default="image", help="file names are PREFIX-seedN.png (default %(default)s)")
    gen.add_argument("--preset", default="lightray-shapes", help="model preset for --local")
    gen.add_argument("--registry", default=None,
                     help="adapter registry for --local --lora (default: $LIGHTRAY_REGISTRY or ./registry; a "
                          "relative folder is taken from the repository root)")
    gen.set_defaults(func=cmd_generate)

    edit = sub.add_parser(
        "edit", help="edit pictures by an instruction (an instruction-edit model) and save the results as PNGs",
        usage="%(prog)s [options] IMAGE [IMAGE ...] INSTRUCTION\n"
              "       %(prog)s [options] --prompt INSTRUCTION IMAGE [IMAGE ...]",
        description="Edit one to three pictures as an instruction says, with an instruction-edit model "
                    f"(Qwen-Image-Edit-Plus family; default {DEFAULT_EDIT_MODEL}), over HTTP (POST "
                    "/v1/images/edits, the pictures as image[] parts in the order given) or in this process "
                    "(--local). The last positional argument is the instruction; with --prompt, every positional "
                    "argument is a picture. The instruction may refer to the pictures in that order.",
        epilog='example: lightray edit out/image-seed7.png "make the circle blue" --seed 3 -o out/')
    edit.add_argument("inputs", nargs="+", metavar="IMAGE ... INSTRUCTION",
                      help="the pictures (PNG, JPEG or WEBP), then the instruction unless --prompt gives it")
    edit.add_argument("--prompt", help="the instruction; every positional argument is then a picture")
    _add_request_options(edit, model_help=f"an instruction-edit model id (default {DEFAULT_EDIT_MODEL}; with "
                                          "--local, the preset's first model)",
                         size_help="WxH, one of the model's sizes (default: the last picture's aspect ratio at the "
                                   "model's default area, snapped to a served size)")
    edit.add_argument("--prefix", default="edit", help="file names are PREFIX-seedN.png (default %(default)s)")
    edit.add_argument("--preset", default=DEFAULT_EDIT_PRESET, help="model preset for --local (default %(default)s)")
    edit.set_defaults(func=cmd_edit, usage_error=edit.error, intermixed_inputs=True)

    add_adapter_commands(sub)
    add_train_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # argparse gives a "+" positional only the first run of positionals: `edit a.png --seed 3 "make it blue"` leaves
    # the instruction over. A command that takes its inputs anywhere among its options gets them back, in order.
    if extras and getattr(args, "intermixed_inputs", False) and not any(e.startswith("-") for e in extras):
        args.inputs += extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

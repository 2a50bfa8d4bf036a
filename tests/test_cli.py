"""The CLI's process handling, what `generate` and `edit` send (generate's HTTP commands are exercised against the
service in test_graph.py), and `edit` end to end: against the app serving the edit model, and in process."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys

import pytest
from PIL import Image

from lightray import cli
from lightray.cli import spawn_interruptible

# Prints whether Python installed its Ctrl-C handler (it does not when SIGINT is ignored at start-up).
REPORT_SIGINT = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"


def test_serve_child_takes_sigint_even_when_started_in_the_background():
    """`lightray serve` stops `serve run` by forwarding SIGINT. Started as a background job, this process (and
    so a plain child) has SIGINT ignored: the child must be rid of that, or the forwarded signal does nothing."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's `cmd &` starts a job
    try:
        plain = subprocess.run([sys.executable, "-c", REPORT_SIGINT], capture_output=True, text=True, timeout=60)
        child = spawn_interruptible([sys.executable, "-c", REPORT_SIGINT], stdout=subprocess.PIPE, text=True)
        out, _ = child.communicate(timeout=60)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert plain.stdout.strip() == "False"  # the inherited ignore is real ...
    assert out.strip() == "True"  # ... and the serve child is rid of it


def test_interrupted_child_stops():
    """SIGINT to a child started with SIG_IGN inherited ends it with KeyboardInterrupt (what `serve run` needs)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = spawn_interruptible(
            [sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(60)"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "up"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert child.returncode != 0 and "KeyboardInterrupt" in err


class _Response:
    status_code = 200

    def json(self):
        return {"data": [{"seed": 1, "b64_json": base64.b64encode(b"\x89PNG fake").decode()}]}


def test_generate_stacks_repeated_lora_and_sends_priority(monkeypatch, tmp_path):
    sent = []
    monkeypatch.setattr(cli.httpx, "post", lambda url, json, **kwargs: sent.append(json) or _Response())
    assert cli.main(["generate", "a circle", "--lora", "acme/style:0.8", "--lora", "acme/subject",
                     "--priority", "batch", "-o", str(tmp_path)]) == 0
    assert sent[-1]["lora"] == ["acme/style:0.8", "acme/subject"] and sent[-1]["priority"] == "batch"
    assert cli.main(["generate", "a circle", "--lora", "acme/style", "-o", str(tmp_path)]) == 0
    assert sent[-1]["lora"] == "acme/style" and "priority" not in sent[-1]  # one --lora: the single-string form
    with pytest.raises(SystemExit):
        cli.main(["generate", "a circle", "--priority", "urgent"])


def test_generate_local_pins_every_adapter(monkeypatch, preset, tmp_path):
    """--local resolves each --lora as the ingress does (latest pinned to its version), in order."""
    import lightray.pipeline
    from testing.adapters import publish_placeholder_adapter

    for _ in range(2):
        publish_placeholder_adapter(tmp_path / "registry", preset, "acme", "style", tmp_path)
    publish_placeholder_adapter(tmp_path / "registry", preset, "acme", "subject", tmp_path)
    specs = []

    class RecordingPipeline:
        def __init__(self, preset_name):
            self.preset = preset

        def generate(self, spec, adapter_paths=None):
            specs.append(spec)
            assert set(adapter_paths) == {a.key for a in spec.adapters}  # fetched for the engine
            return [Image.new("RGB", (spec.width, spec.height))] * len(spec.seeds)

    monkeypatch.setattr(lightray.pipeline, "LocalPipeline", RecordingPipeline)
    assert cli.main(["generate", "a circle", "--local", "--registry", str(tmp_path / "registry"), "--size", "128x64",
                     "--lora", "acme/style:0.5", "--lora", "acme/subject", "--priority", "batch",
                     "-o", str(tmp_path / "out")]) == 0
    assert [(a.ref, a.scale) for a in specs[-1].adapters] == [("acme/style@v2", 0.5), ("acme/subject@v1", 1.0)]
    assert specs[-1].priority == "batch"
    assert (specs[-1].width, specs[-1].height) == (128, 64)



@pytest.mark.parametrize("arguments, message", [
    (["-n", "0"], "error: n: Input should be greater than or equal to 1"),
    (["--size", "100x100"], "error: size: 100x100 is not served"),
])
def test_generate_local_names_the_field_of_a_refused_request(monkeypatch, preset, capsys, arguments, message):
    import lightray.pipeline

    class UnusedPipeline:
        def __init__(self, preset_name):
            self.preset = preset

        def generate(self, spec, adapter_paths=None):
            pytest.fail("a refused request was drawn")

    monkeypatch.setattr(lightray.pipeline, "LocalPipeline", UnusedPipeline)
    assert cli.main(["generate", "a circle", "--local", *arguments]) == 1
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ lightray edit

EDIT_MODEL = "lightray-shapes-edit-lightning-4"  # what `lightray edit` asks for without --model


def _pictures(tmp_path, count: int) -> list[str]:
    """`count` small shapes-world PNGs, each different, as files."""
    from lightray.world.shapes import Scene, render

    paths = []
    for i, color in zip(range(count), ("red", "green", "blue", "yellow")):
        path = tmp_path / f"{color}.png"
        render(Scene(color, "circle", "left", "white"), 64).save(path)
        paths.append(str(path))
    return paths


def test_edit_sends_the_pictures_in_order_and_the_last_argument_as_the_instruction(monkeypatch, tmp_path):
    sent = []
    monkeypatch.setattr(cli.httpx, "post", lambda url, **kwargs: sent.append((url, kwargs)) or _Response())
    first, second = _pictures(tmp_path, 2)
    out = tmp_path / "out"
    assert cli.main(["edit", first, second, "make the circle blue", "--seed", "3", "--steps", "4",
                     "--size", "64x64", "--url", "http://lightray.test", "-o", str(out)]) == 0
    url, request = sent[-1]
    assert url == "http://lightray.test/v1/images/edits"
    assert [(name, part[0]) for name, part in request["files"]] == [("image[]", "red.png"), ("image[]", "green.png")]
    assert request["files"][1][1][1] == open(second, "rb").read()
    assert request["data"] == {"prompt": "make the circle blue", "model": EDIT_MODEL, "n": "1", "seed": "3",
                               "num_inference_steps": "4", "size": "64x64", "response_format": "b64_json"}
    assert (out / "edit-seed1.png").read_bytes() == b"\x89PNG fake"
    # With --prompt every positional argument is a picture; --model picks another edit model.
    assert cli.main(["edit", first, second, "--prompt", "把背景变成黑色", "--model", "other-edit",
                     "-o", str(out)]) == 0
    url, request = sent[-1]
    assert len(request["files"]) == 2 and request["data"]["prompt"] == "把背景变成黑色"
    assert request["data"]["model"] == "other-edit" and "seed" not in request["data"]


@pytest.mark.parametrize("arguments, message", [
    (["{0}"], "give the pictures, then the instruction"),
    (["{0}", "{1}"], "is a file: add the instruction after the pictures"),
    (["{0}", "missing.png", "make it blue"], "no such picture: missing.png"),
    (["missing.png", "--prompt", "make it blue"], "no such picture: missing.png"),
])
def test_edit_usage_mistakes_are_named_before_anything_is_sent(monkeypatch, tmp_path, capsys, arguments, message):
    monkeypatch.setattr(cli.httpx, "post", lambda *a, **k: pytest.fail("nothing should be sent"))
    pictures = _pictures(tmp_path, 2)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["edit", *(a.format(*pictures) for a in arguments)])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_edit_over_http_saves_the_services_images_and_prints_its_errors(monkeypatch, tmp_path, capsys,
                                                                         make_app_with_edit_model, edit_pipeline):
    """`lightray edit --url` against the real app serving the edit model (in process, through its test client)."""
    from fastapi.testclient import TestClient

    from lightray.schemas import ImageEditRequest

    pictures = _pictures(tmp_path, 4)
    with TestClient(make_app_with_edit_model(), base_url="http://localhost") as client:
        # The test client runs the app in this process; a client-side timeout means nothing to it.
        monkeypatch.setattr(cli.httpx, "post", lambda url, timeout, **kwargs: client.post(url, **kwargs))
        assert cli.main(["edit", *pictures[:2], "make the circle blue", "--seed", "3", "--steps", "2",
                         "--size", "64x64", "--url", "http://localhost", "-o", str(tmp_path / "out")]) == 0
        saved = Image.open(tmp_path / "out" / "edit-seed3.png")
        spec = ImageEditRequest(prompt="make the circle blue", model=EDIT_MODEL, seed=3, num_inference_steps=2,
                                size="64x64").resolve_instruction(edit_pipeline.preset, 0, [(64, 64)] * 2)
        expected = edit_pipeline.instruct(spec, [Image.open(p).convert("RGB") for p in pictures[:2]])[0]
        assert saved.size == (64, 64) and saved.tobytes() == expected.tobytes()
        capsys.readouterr()
        assert cli.main(["edit", *pictures, "make the circle blue", "--url", "http://localhost",
                         "-o", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error 400:") and '"param":"image"' in error.replace(" ", "")


def test_edit_local_runs_the_edit_preset_in_process(monkeypatch, tmp_path, capsys, edit_pipeline):
    import lightray.pipeline
    from lightray.schemas import ImageEditRequest

    monkeypatch.setattr(lightray.pipeline, "LocalPipeline", lambda preset: edit_pipeline)  # loaded once per session
    first, second = _pictures(tmp_path, 2)
    assert cli.main(["edit", first, second, "make the circle blue", "--local", "--seed", "5", "-n", "2",
                     "--steps", "2", "--size", "64x64", "-o", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / f"edit-seed{s}.png") for s in (5, 6)]
    spec = ImageEditRequest(prompt="make the circle blue", seed=5, n=2, num_inference_steps=2,
                            size="64x64").resolve_instruction(edit_pipeline.preset, 0, [(64, 64)] * 2)
    expected = edit_pipeline.instruct(spec, [Image.open(p).convert("RGB") for p in (first, second)])
    for seed, image in zip((5, 6), expected):
        assert Image.open(tmp_path / "out" / f"edit-seed{seed}.png").tobytes() == image.tobytes()


@pytest.mark.parametrize("extra, message", [
    (["{3}"], "error: image: this model edits 1 to 3 input images, got 4"),
    (["--size", "100x100"], "error: size: 100x100 is not served"),
    (["--steps", "0"], "error: num_inference_steps: "),
    (["--preset", "lightray-shapes"], "does not edit by instruction"),
    (["{text}"], "is not an image"),
])
def test_edit_local_refuses_bad_input_before_loading_the_model(monkeypatch, tmp_path, capsys, extra, message):
    import lightray.pipeline

    monkeypatch.setattr(lightray.pipeline, "LocalPipeline", lambda preset: pytest.fail("the model was loaded"))
    pictures = _pictures(tmp_path, 4)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    arguments = [a.format(*pictures, text=text) for a in extra]
    assert cli.main(["edit", *pictures[:3], "--prompt", "make the circle blue", "--local", *arguments]) == 1
    assert message in capsys.readouterr().err


def test_edit_takes_its_pictures_and_instruction_between_options(monkeypatch, tmp_path):
    sent = []
    monkeypatch.setattr(cli.httpx, "post", lambda url, **kwargs: sent.append(kwargs) or _Response())
    first, second = _pictures(tmp_path, 2)
    assert cli.main(["edit", first, "--seed", "3", second, "-o", str(tmp_path), "make the circle blue"]) == 0
    assert [part[0] for _, part in sent[-1]["files"]] == ["red.png", "green.png"]
    assert sent[-1]["data"]["prompt"] == "make the circle blue" and sent[-1]["data"]["seed"] == "3"
    with pytest.raises(SystemExit):  # an unknown option is still refused
        cli.main(["edit", first, "--sede", "3", "make the circle blue"])


# ------------------------------------------------------------------ `lightray serve`: auth off only on loopback

def _serve_yaml(tmp_path, host: str, args: dict, env_vars: dict | None = None):
    import yaml

    app = {"name": "lightray", "import_path": "serve_app.app:build_app", "args": args}
    if env_vars is not None:
        app["runtime_env"] = {"env_vars": env_vars}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"http_options": {"host": host, "port": 8000}, "applications": [app]}))
    return path


class _Spawned(Exception):
    pass


def _no_spawn(*args, **kwargs):
    raise _Spawned


@pytest.mark.parametrize("host,args,env_vars", [
    ("0.0.0.0", {"auth_enabled": False}, None),
    ("::", {"auth_enabled": "false"}, None),
    ("10.1.2.3", {}, {"LIGHTRAY_AUTH_ENABLED": "0"}),
])
def test_serve_refuses_auth_off_on_a_non_loopback_bind(monkeypatch, tmp_path, capsys, host, args, env_vars):
    """With no API keys every caller that reaches the port is the local user, so auth off needs a loopback bind:
    `lightray serve` refuses the config before starting anything, naming the host and the setting."""
    monkeypatch.setattr(cli, "spawn_interruptible", _no_spawn)
    monkeypatch.delenv("LIGHTRAY_AUTH_ENABLED", raising=False)
    assert cli.main(["serve", str(_serve_yaml(tmp_path, host, args, env_vars))]) == 2
    err = capsys.readouterr().err
    assert "auth_enabled" in err and repr(host) in err and "loopback" in err


def test_serve_refuses_auth_off_from_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "spawn_interruptible", _no_spawn)
    monkeypatch.setenv("LIGHTRAY_AUTH_ENABLED", "false")
    assert cli.main(["serve", str(_serve_yaml(tmp_path, "0.0.0.0", {}))]) == 2


@pytest.mark.parametrize("host,args", [
    ("127.0.0.1", {"auth_enabled": False}), ("localhost", {"auth_enabled": False}), ("::1", {"auth_enabled": False}),
    ("0.0.0.0", {}), ("0.0.0.0", {"auth_enabled": True}),
])
def test_serve_starts_auth_off_on_loopback_and_auth_on_anywhere(monkeypatch, tmp_path, host, args):
    monkeypatch.setattr(cli, "spawn_interruptible", _no_spawn)
    monkeypatch.delenv("LIGHTRAY_AUTH_ENABLED", raising=False)
    with pytest.raises(_Spawned):
        cli.main(["serve", str(_serve_yaml(tmp_path, host, args))])


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_the_shipped_serve_configs_pass_the_bind_check(monkeypatch, name):
    import yaml

    from lightray.config import REPO_ROOT

    monkeypatch.delenv("LIGHTRAY_AUTH_ENABLED", raising=False)
    cli.check_serve_config(yaml.safe_load((REPO_ROOT / "configs/serve" / name).read_text()), {})

"""The CLI's process handling, and what `generate` sends (its HTTP commands are exercised against the service in
test_graph.py)."""

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
    from lightray.contracts import AdapterUse

    for _ in range(2):
        publish_placeholder_adapter(tmp_path / "registry", preset, "acme", "style", tmp_path)
    publish_placeholder_adapter(tmp_path / "registry", preset, "acme", "subject", tmp_path)
    specs = []

    class RecordingPipeline:
        def __init__(self, preset_name):
            self.preset = preset

        def generate(self, spec, adapter_paths=None):
            specs.append(spec)
            assert set(adapter_paths) == {a.ref for a in spec.adapters}  # fetched for the engine
            return [Image.new("RGB", (spec.width, spec.height))] * len(spec.seeds)

    monkeypatch.setattr(lightray.pipeline, "LocalPipeline", RecordingPipeline)
    assert cli.main(["generate", "a circle", "--local", "--registry", str(tmp_path / "registry"), "--size", "128x64",
                     "--lora", "acme/style:0.5", "--lora", "acme/subject", "--priority", "batch",
                     "-o", str(tmp_path / "out")]) == 0
    assert specs[-1].adapters == (AdapterUse("acme/style@v2", 0.5), AdapterUse("acme/subject@v1", 1.0))
    assert specs[-1].priority == "batch"
    assert (specs[-1].width, specs[-1].height) == (128, 64)

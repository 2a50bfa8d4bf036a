"""The import rules between layers (docs/engine.md, ../shared/DESIGN.md): checked in fresh interpreters, so what a
process really loads is what is tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft")


def modules_after_import(*names: str) -> set[str]:
    code = ("import json, sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_ingress_module_graph_does_not_import_torch():
    """The Ingress replica imports serve_app.app (to build its FastAPI app) and the typed contracts: none of
    that may load torch or the model libraries, which would cost the ingress hundreds of MiB."""
    loaded = modules_after_import("serve_app.app", "serve_app.api", "lightray.contracts", "lightray.schemas")
    assert not [m for m in HEAVY if m in loaded]
    assert "fastapi" in loaded  # it did import the app


def test_the_core_library_has_no_ray_import():
    """`lightray/` stays usable without Ray: the engine, stages and pipeline import no `ray` module."""
    loaded = modules_after_import("lightray.engine", "lightray.pipeline", "lightray.stages")
    assert "torch" in loaded  # the heavy part did load
    assert not [m for m in loaded if m == "ray" or m.startswith("ray.")]

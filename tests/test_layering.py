"""The import rules between layers (docs/architecture.md, "Layers, and what each may import"): what the ingress and
the core load, checked in fresh interpreters so what a process really loads is what is tested; and, read from the
source, that nothing imports upwards and no package's modules import each other in a cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers", "peft")
LAYERS = ("lightray", "deployments", "serve_app")
"""Bottom to top: a layer may import the ones before it, never one after it."""
BESIDE = ("jobs", "testing", "benchmarks", "planning", "tests")
"""Beside the layers: they may import any layer; no layer imports them."""
HTTP = ("fastapi", "starlette")
"""The HTTP frameworks: the edge's (`serve_app`); the core raises errors without status codes and answers no
HTTP."""


def modules_after_import(*names: str) -> set[str]:
    code = ("import json, sys\n" + "".join(f"import {n}\n" for n in names)
            + "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_ingress_module_graph_does_not_import_torch():
    """The Ingress replica imports serve_app.app (to build its FastAPI app) and the typed contracts: none of
    that may load torch or the model libraries, which would cost the ingress hundreds of MiB."""
    loaded = modules_after_import("serve_app.app", "serve_app.api", "lightray.contracts", "lightray.schemas",
                                  "lightray.errors")
    assert not [m for m in HEAVY if m in loaded]
    assert "fastapi" in loaded  # it did import the app


def test_the_core_library_has_no_ray_import():
    """`lightray/` stays usable without Ray: the engine, stages and pipeline import no `ray` module."""
    loaded = modules_after_import("lightray.engine", "lightray.pipeline", "lightray.stages")
    assert "torch" in loaded  # the heavy part did load
    assert not [m for m in loaded if m == "ray" or m.startswith("ray.")]



def _sources() -> dict[str, Path]:
    """Module name → file, for every module of the layers."""
    out = {}
    for layer in LAYERS:
        for path in (REPO / layer).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every name `source` (the text of `module`) imports, at any depth: function bodies and `TYPE_CHECKING`
    blocks included; `from a.b import c` gives `a.b` and `a.b.c`; relative imports resolved."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def upward_imports(names: set[str], module: str) -> set[str]:
    """The names `module` may not import: a layer above its own, a folder beside the layers, or (for the core,
    `lightray`) an HTTP framework."""
    layer = module.split(".")[0]
    allowed = LAYERS[: LAYERS.index(layer) + 1]
    return {n for n in names
            if (n.split(".")[0] in LAYERS and n.split(".")[0] not in allowed) or n.split(".")[0] in BESIDE
            or (layer == "lightray" and n.split(".")[0] in HTTP)}


def test_no_layer_imports_a_layer_above_it_or_a_folder_beside_them():
    """Nor the core an HTTP framework (`HTTP`)."""
    found = [f"{module} imports {name}" for module, path in _sources().items()
             for name in upward_imports(imported_names(path.read_text(), module, path.name == "__init__.py"), module)]
    assert not found, "\n".join(sorted(found))


@pytest.mark.parametrize("module, source, upward", [
    ("lightray.x", "from serve_app import app", True),
    ("deployments.x", "def f():\n    import serve_app.api", True),
    ("lightray.x", "from testing.local_cluster import RayCluster", True),
    ("serve_app.x", "from planning.capacity import budgets", True),
    ("serve_app.x", "import deployments", False),
    ("lightray.x", "from fastapi import Request", True),
    ("serve_app.x", "from fastapi import Request", False),
    ("lightray.engine.x", "from . import scheduler", False),
])
def test_the_upward_rule_reads_imports_as_python_does(module, source, upward):
    assert bool(upward_imports(imported_names(source, module), module)) == upward


def module_graph() -> dict[str, set[str]]:
    """Module → the modules of the layers it imports (`from package import module` counts as the module)."""
    sources = _sources()
    graph = {}
    for module, path in sources.items():
        found = {n for n in imported_names(path.read_text(), module, path.name == "__init__.py") if n in sources}
        graph[module] = {n for n in found if not any(m.startswith(n + ".") for m in found)} - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                on_stack.discard(w)
                component.append(w)
            on_stack.discard(v)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_two_modules_import_each_other():
    """A package's `__init__` re-exporting its own modules is no cycle (they import their siblings, not it); two
    modules that need each other are: a seam in the wrong place, which breaks once an import moves to the top."""
    assert not cycles(module_graph())


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]

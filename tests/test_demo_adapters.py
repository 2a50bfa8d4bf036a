"""The demo adapters shipped in the seed registry (`models/demo-registry/`): trained on the shipped embedded model
(their fingerprint must match it: retraining the base means retraining them), published by `lightray serve` into
the service's registry without ever overwriting what a user has there."""

from __future__ import annotations

import pytest

from lightray.config import load_preset
from lightray.demo_adapters import DEMO_ADAPTERS, DEMO_REGISTRY, seed_registry
from lightray.fingerprint import fingerprint_model
from lightray.registry import AdapterRegistry
from testing.adapters import publish_placeholder_adapter

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def seed() -> AdapterRegistry:
    return AdapterRegistry(str(DEMO_REGISTRY))


def test_the_demo_adapters_were_trained_on_the_shipped_base(seed):
    """A base retrained without its demo adapters fails here: their manifests record the weights they learnt on."""
    shapes = load_preset("lightray-shapes")
    manifests = {m.ref.split("@")[0]: m for m in seed.manifests()}
    assert set(manifests) == set(DEMO_ADAPTERS)
    for manifest in manifests.values():
        assert manifest.base_model_id == shapes.base_model_id and manifest.base_family == shapes.family
        assert manifest.base_fingerprint == fingerprint_model(shapes), f"{manifest.ref}: retrain it on the new base"
        assert manifest.visibility == "public" and manifest.trigger_words
        assert manifest.training_config["steps"] == manifest.metrics["steps"]  # a finished run, not a checkpoint


def test_seeding_publishes_once_and_never_overwrites_or_revives(seed, tmp_path):
    shapes = load_preset("lightray-shapes")
    registry = AdapterRegistry(str(tmp_path / "registry"), cache_dir=tmp_path / "cache")
    mine = publish_placeholder_adapter(tmp_path / "registry", shapes, "acme", "style", tmp_path)
    published = seed_registry(registry, {shapes.base_model_id})
    assert sorted(published) == sorted(m.ref for m in seed.manifests())
    for ref in published:
        ours, theirs = registry.resolve(ref), seed.resolve(ref)
        assert ours.files == theirs.files and ours.base_fingerprint == theirs.base_fingerprint
    assert registry.resolve("acme/style") == mine
    assert seed_registry(registry, {shapes.base_model_id}) == []  # already there: untouched
    registry.delete(published[0])
    assert seed_registry(registry, {shapes.base_model_id}) == []  # deleted by its user: stays deleted
    assert registry.versions(published[0].split("@")[0]) == []


def test_seeding_skips_adapters_of_models_not_served(tmp_path):
    registry = AdapterRegistry(str(tmp_path / "registry"))
    assert seed_registry(registry, {load_preset("lightray-shapes-edit").base_model_id}) == []
    assert registry.manifests() == []

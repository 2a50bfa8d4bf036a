"""An adapter loads only into the base it was trained for: the preset's explicit `base_model_id`, and, when the
manifest records one, the fingerprint of the weights this process serves (checked at load, not only at training)."""

from __future__ import annotations

import pytest
import yaml

from lightray.adapters import fetch_for_preset
from lightray.config import MODEL_PRESETS_DIR, load_preset
from lightray.fingerprint import fingerprint_model
from lightray.registry import AdapterIncompatible
from lightray.registry_settings import open_registry
from testing.adapters import publish_placeholder_adapter


def test_every_preset_names_its_base_model_id_explicitly():
    for path in sorted(MODEL_PRESETS_DIR.glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["base_model_id"] == load_preset(path).base_model_id
    # Published adapters of the embedded model record this value; it must not change with a rename.
    assert load_preset("lightray-shapes").base_model_id == "lightray-shapes"


def test_loading_checks_the_adapters_base_fingerprint(preset, tmp_path):
    root = tmp_path / "registry"
    registry = open_registry(str(root))
    matching = publish_placeholder_adapter(root, preset, "acme", "same", tmp_path,
                                           base_fingerprint=fingerprint_model(preset))
    unrecorded = publish_placeholder_adapter(root, preset, "acme", "old", tmp_path)
    other = publish_placeholder_adapter(root, preset, "acme", "other", tmp_path,
                                        base_fingerprint="sha256:" + "0" * 64)
    assert fetch_for_preset(registry, matching.ref, preset)[0] == matching
    assert fetch_for_preset(registry, unrecorded.ref, preset)[0] == unrecorded  # published without one: id only
    with pytest.raises(AdapterIncompatible, match="fingerprint"):
        fetch_for_preset(registry, other.ref, preset)

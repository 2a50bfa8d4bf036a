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


def test_an_adapter_fits_by_family_then_by_base(preset, tmp_path):
    """`check_fits`: another family's transformer is `AdapterOfAnotherFamily` (the ingress's 400), another base of
    the same transformer `AdapterIncompatible` (422); a base the preset also serves (`adapter_base_model_ids`)
    fits without its fingerprint compared, since distilled weights differ by design."""
    from lightray.adapters import AdapterOfAnotherFamily, check_fits

    root = tmp_path / "registry"
    edit = load_preset("lightray-shapes-edit")
    of_21 = publish_placeholder_adapter(root, preset, "acme", "a", tmp_path, base_family="qwen-image-2.1")
    of_edit = publish_placeholder_adapter(root, edit, "acme", "b", tmp_path, base_fingerprint="sha256:" + "1" * 64)
    with pytest.raises(AdapterOfAnotherFamily, match="qwen-image-2.1 family"):
        check_fits(of_21, preset)
    with pytest.raises(AdapterIncompatible, match="trained for base model") as refused:
        check_fits(of_edit, preset)  # the same transformer class, another base
    assert not isinstance(refused.value, AdapterOfAnotherFamily)
    distilled = preset.model_copy(update={"adapter_base_model_ids": [edit.base_model_id]})
    check_fits(of_edit, distilled, fingerprint_model(preset))
    with pytest.raises(AdapterIncompatible, match="fingerprint"):
        check_fits(of_edit, edit, fingerprint_model(edit))

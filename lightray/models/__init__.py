"""Model families: what is specific to one kind of Qwen-Image-class model, behind one small interface.

The engine, the stages, the trainer and the capacity planner ask a preset's family (`family_of(preset)`), never a
model class, what a request's rows look like. A family is one folder here:

* `qwen_image/`: text-to-image (Qwen-Image, Qwen-Image-2512), with img2img and inpainting for edits;
* `qwen_image_edit/`: instruction editing with 1-3 input images (Qwen-Image-Edit-2509 / 2511);
* `qwen_image_21/`: Qwen-Image-2.1 and its Turbo, generation and editing in one model, with a prefix KV cache.

docs/models.md says how to add one. This package imports no torch at the top: the ingress reads families to
validate requests.
"""

from __future__ import annotations

from lightray.models.base import ModelFamily
from lightray.models.qwen_image import QWEN_IMAGE
from lightray.models.qwen_image_21 import QWEN_IMAGE_21
from lightray.models.qwen_image_edit import QWEN_IMAGE_EDIT_PLUS

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (QWEN_IMAGE, QWEN_IMAGE_EDIT_PLUS, QWEN_IMAGE_21)}
"""Every family, by the name a preset's `family` gives."""


def family_named(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None

"""The Qwen VL processors (Qwen2-VL's for the Edit family, Qwen3-VL's for 2.1) with transformers' PIL image
processor: the default one needs torchvision, which a CPU node does not have, and its resize differs from the PIL
one by rounding only."""

from __future__ import annotations

IMAGE_PROCESSOR_KEYS = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                        "image_std", "size")
"""The keys of a folder's `preprocessor_config.json` the PIL image processor takes."""


def pil_processor(processor_class: type, preprocessor_config: dict, tokenizer, chat_template: str | None = None):
    """A `processor_class` (`Qwen2VLProcessor`, `Qwen3VLProcessor`) around `tokenizer`, with the PIL Qwen2-VL image
    processor built from `preprocessor_config` and no video processor."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class _Processor(processor_class):
        # transformers checks every attribute's class, the absent video processor's too, and that check imports
        # the video processor classes, which need torchvision.
        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    image_processor = Qwen2VLImageProcessorPil(
        **{k: preprocessor_config[k] for k in IMAGE_PROCESSOR_KEYS if k in preprocessor_config})
    return _Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

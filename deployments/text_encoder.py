from __future__ import annotations

from ray import serve

from deployments.timing import timed
from lightray.config import load_preset
from lightray.stages import TextEncodeStage


@serve.deployment(name="TextEncoder", max_ongoing_requests=8)
class TextEncoder:
    def __init__(self, preset: dict):
        self.stage = TextEncodeStage(load_preset(preset))

    def encode(self, prompts: list[str]) -> dict:
        """{"embeds": [array per prompt], "timings": {"encode_ms": …}}"""
        timings: dict[str, float] = {}
        with timed(timings, "encode_ms"):
            embeds = self.stage.encode(prompts)
        return {"embeds": embeds, "timings": timings}

    def check_health(self) -> None:
        # A replica whose model object is gone (failed reload) must be replaced, not routed to.
        if self.stage.pipe.text_encoder is None:
            raise RuntimeError("text encoder not loaded")

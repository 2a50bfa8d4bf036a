from __future__ import annotations

from ray import serve

from deployments.metrics import handoff_at, log_request, record_queue_wait, record_stages
from deployments.timing import timed
from lightray.config import load_preset
from lightray.stages import TextEncodeStage


@serve.deployment(name="TextEncoder", max_ongoing_requests=8)
class TextEncoder:
    def __init__(self, preset: dict):
        self.stage = TextEncodeStage(load_preset(preset))

    def encode(self, prompts: list[str], handoff: float | None = None) -> dict:
        """{"embeds": [array per prompt], "timings": {"encode_ms": …}, "handoff_at": wall-clock s}. `handoff`: when
        the ingress sent the request (wall-clock s), for the queue-wait metric."""
        timings: dict[str, float] = {}
        record_queue_wait("encode", timings, handoff)
        with timed(timings, "encode_ms"):
            embeds = self.stage.encode(prompts)
        record_stages(timings, "encode_ms")
        log_request("encode", prompts=len(prompts), tokens=sum(len(e) for e in embeds),
                    wait_ms=timings.get("encode_wait_ms"), encode_ms=timings["encode_ms"])
        return {"embeds": embeds, "timings": timings, "handoff_at": handoff_at()}

    def check_health(self) -> None:
        # A replica whose model object is gone (failed reload) must be replaced, not routed to.
        if self.stage.pipe.text_encoder is None:
            raise RuntimeError("text encoder not loaded")

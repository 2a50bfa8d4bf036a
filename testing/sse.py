"""Reading the API's server-sent events (tests, testing/multinode.py, benchmarks)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image


def parse_sse(raw: str) -> list[tuple[str | None, dict]]:
    """(event name, JSON data) of every event in a text/event-stream body."""
    events = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)

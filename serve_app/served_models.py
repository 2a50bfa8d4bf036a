"""The models one service serves: one backend (one graph of stage deployments) per model preset, and which of
them answers a request. A preset serves several model ids (its variants); `model` picks the preset, and without it
the first preset that serves the endpoint answers (the first preset listed is the default)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from lightray.models.base import Endpoint
from lightray.errors import NotFound, RequestError
from serve_app.responses import ModelCard
from serve_app.backend import GenerationBackend


class ServedModels:
    def __init__(self, backends: Sequence[GenerationBackend]):
        if not backends:
            raise ValueError("a service serves at least one model preset")
        ids = [m for b in backends for m in b.preset.model_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique across the served presets, got {ids}")
        self.backends = tuple(backends)

    @property
    def default(self) -> GenerationBackend:
        return self.backends[0]

    @property
    def model_ids(self) -> list[str]:
        return [m for b in self.backends for m in b.preset.model_ids]

    def for_request(self, model: str | None, endpoint: Endpoint) -> GenerationBackend:
        """The backend whose preset serves `model` on `endpoint`: 404 naming `model` when no preset serves it, 400
        when its preset does not serve the endpoint (generations with an edit-only model)."""
        if model is None:
            for backend in self.backends:
                if endpoint in backend.preset.model_family.endpoints:
                    return backend
            raise RequestError("model", f"no served model answers /v1/images/{endpoint}; name one of "
                                        f"{', '.join(self.model_ids)}")
        for backend in self.backends:
            if model in backend.preset.model_ids:
                family = backend.preset.model_family
                if endpoint not in family.endpoints:
                    serves = " and ".join(f"/v1/images/{e}" for e in family.endpoints)
                    raise RequestError("model", f"model {model!r} ({family.name}) is served on {serves}, not "
                                                f"/v1/images/{endpoint}")
                return backend
        # A variant a fused preset defines but does not serve, and no other preset serves: refused, never sent to a
        # replica whose weights hold another variant's Lightning LoRA.
        for backend in self.backends:
            if (refusal := backend.preset.unserved_refusal(model)) is not None:
                raise RequestError("model", f"{refusal}; served: {', '.join(self.model_ids)}")
        raise NotFound("model", f"model {model!r} does not exist; available: {', '.join(self.model_ids)}",
                       code="model_not_found")

    def cards(self) -> list[ModelCard]:
        return [ModelCard.of(b.preset, m) for b in self.backends for m in b.preset.model_ids]

    def card(self, model_id: str) -> ModelCard:
        for backend in self.backends:
            if model_id in backend.preset.model_ids:
                return ModelCard.of(backend.preset, model_id)
        raise NotFound("model", f"model {model_id!r} does not exist", code="model_not_found")

    async def readiness(self) -> dict[str, bool]:
        """Every backend's stages; a preset after the first names its stages `<stage>-<preset name>`, as its
        deployments are named (`serve_app.app.stage_name`)."""
        answers = await asyncio.gather(*(b.readiness() for b in self.backends))
        stages: dict[str, bool] = {}
        for i, (backend, answer) in enumerate(zip(self.backends, answers)):
            for stage, ok in answer.items():
                stages[stage if i == 0 else f"{stage}-{backend.preset.name}"] = ok
        return stages

from __future__ import annotations

from fastapi import APIRouter, Depends

from lightray.schemas import ModelCard, ModelList, RequestError
from serve_app.backend import GenerationBackend
from serve_app.dependencies import get_backend, get_principal
from serve_app.openapi_errors import error_responses

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_principal)],
                   responses=error_responses(401))


@router.get("/models", response_model=ModelList)
async def list_models(backend: GenerationBackend = Depends(get_backend)) -> ModelList:
    return ModelList(data=[ModelCard.of(backend.preset, m) for m in backend.preset.model_ids])


@router.get("/models/{model_id}", response_model=ModelCard, responses=error_responses(404))
async def get_model(model_id: str, backend: GenerationBackend = Depends(get_backend)) -> ModelCard:
    if model_id not in backend.preset.model_ids:
        raise RequestError("model", f"model {model_id!r} does not exist", status=404, code="model_not_found")
    return ModelCard.of(backend.preset, model_id)

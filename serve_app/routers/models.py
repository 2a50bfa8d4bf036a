from __future__ import annotations

from fastapi import APIRouter, Depends

from serve_app.responses import ModelCard, ModelList
from serve_app.dependencies import get_models, get_principal
from serve_app.openapi_errors import error_responses
from serve_app.served_models import ServedModels

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(get_principal)],
                   responses=error_responses(401))


@router.get("/models", response_model=ModelList)
async def list_models(models: ServedModels = Depends(get_models)) -> ModelList:
    return ModelList(data=models.cards())


@router.get("/models/{model_id}", response_model=ModelCard, responses=error_responses(404))
async def get_model(model_id: str, models: ServedModels = Depends(get_models)) -> ModelCard:
    return models.card(model_id)

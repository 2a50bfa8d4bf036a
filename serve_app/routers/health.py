from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serve_app.dependencies import get_models
from serve_app.served_models import ServedModels

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness of the ingress itself."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Some stage is not ready (`stages` says which)."}})
async def readyz(models: ServedModels = Depends(get_models)) -> JSONResponse:
    """Ready only when every stage deployment of every served model is healthy (the ingress can be up before
    them)."""
    stages = await models.readiness()
    ok = bool(stages) and all(stages.values())
    return JSONResponse({"ready": ok, "stages": stages}, status_code=200 if ok else 503)

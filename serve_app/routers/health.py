from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from serve_app.backend import GenerationBackend
from serve_app.dependencies import get_backend

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness of the ingress itself."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Some stage is not ready (`stages` says which)."}})
async def readyz(backend: GenerationBackend = Depends(get_backend)) -> JSONResponse:
    """Ready only when every stage deployment is healthy (the ingress can be up before them)."""
    stages = await backend.readiness()
    ok = bool(stages) and all(stages.values())
    return JSONResponse({"ready": ok, "stages": stages}, status_code=200 if ok else 503)

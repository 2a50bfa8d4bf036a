"""The web playground: one static page (serve_app/static/playground.html) at `/playground`, and `/` redirecting to
it. The page needs no key to load; its API calls send the key the user enters, as every client does."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

PAGE = Path(__file__).resolve().parent.parent / "static" / "playground.html"

router = APIRouter(include_in_schema=False)


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/playground", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    return HTMLResponse(_page())


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/playground")

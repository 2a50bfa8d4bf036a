"""FastAPI dependencies: everything a router needs comes from app.state, set by `create_app`."""

from __future__ import annotations

from fastapi import Request

from lightray.registry import AdapterRegistry
from serve_app.backend import GenerationBackend
from serve_app.image_store import ImageStore
from serve_app.settings import ServiceSettings


def get_backend(request: Request) -> GenerationBackend:
    return request.app.state.backend


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


def get_image_store(request: Request) -> ImageStore:
    return request.app.state.image_store

"""Typed FastAPI dependencies: what routes receive instead of importing globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapters.registry import Registry
from server.config import Settings
from server.generation import Generator
from server.observe import RequestRecord, request_record


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_generator(request: Request) -> Generator:
    return request.app.state.generator


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
GeneratorDep = Annotated[Generator, Depends(get_generator)]
RecordDep = Annotated[RequestRecord, Depends(request_record)]

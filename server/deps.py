"""Typed FastAPI dependencies: what routes receive instead of importing globals."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapters.registry import Registry
from server.auth import AdminOnly, KeyRing, Principal
from server.config import Settings
from server.generation import Generator
from server.observe import RequestRecord, request_record
from server.tenancy import Tenants


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_generator(request: Request) -> Generator:
    return request.app.state.generator


def get_keyring(request: Request) -> KeyRing:
    return request.app.state.keyring


def get_tenants(request: Request) -> Tenants:
    return request.app.state.tenants


def get_principal(request: Request) -> Principal:
    """Who is calling, from `Authorization: Bearer KEY`; 401 without a valid key."""
    principal = request.app.state.keyring.authenticate(request.headers.get("authorization"))
    request_record(request).tenant = principal.tenant
    return principal


def require_admin(request: Request) -> Principal:
    principal = get_principal(request)
    if not principal.admin:
        raise AdminOnly(f"{request.method} {request.url.path}")
    return principal


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
GeneratorDep = Annotated[Generator, Depends(get_generator)]
RecordDep = Annotated[RequestRecord, Depends(request_record)]
KeyRingDep = Annotated[KeyRing, Depends(get_keyring)]
TenantsDep = Annotated[Tenants, Depends(get_tenants)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]

"""Typed FastAPI dependencies: what routes receive instead of importing globals.

All are `async def`: FastAPI runs a plain `def` dependency in a worker thread, and those thread
hops were a visible share of each request's CPU time in the profile.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from adapters.registry import Registry
from server.config import Settings
from server.http.auth import AdminOnly, KeyRing, Principal
from server.http.observe import RequestRecord, request_record
from server.http.tenancy import Tenants


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_keyring(request: Request) -> KeyRing:
    return request.app.state.keyring


async def get_tenants(request: Request) -> Tenants:
    return request.app.state.tenants


def _principal(request: Request) -> Principal:
    principal = request.app.state.keyring.authenticate(request.headers.get("authorization"))
    request_record(request).tenant = principal.tenant
    return principal


async def get_principal(request: Request) -> Principal:
    """Who is calling, from `Authorization: Bearer KEY`; 401 without a valid key."""
    return _principal(request)


async def get_record(request: Request) -> RequestRecord:
    return request_record(request)


async def require_metrics_reader(request: Request) -> None:
    """GET /metrics: the admin key or --metrics-key; 401 or 403 otherwise (open mode: anyone)."""
    request.app.state.keyring.authenticate_metrics(request.headers.get("authorization"))


async def require_admin(request: Request) -> Principal:
    principal = _principal(request)
    if not principal.admin:
        raise AdminOnly(f"{request.method} {request.url.path}")
    return principal


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
RecordDep = Annotated[RequestRecord, Depends(get_record)]
KeyRingDep = Annotated[KeyRing, Depends(get_keyring)]
TenantsDep = Annotated[Tenants, Depends(get_tenants)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(require_admin)]

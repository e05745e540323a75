"""Tenants and their API keys: the admin's API. A key is shown once, when it is made."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from server.admin import tenant_deletion
from server.http.deps import AdminDep, KeyRingDep, RegistryDep, TenantsDep
from server.http.errors import GatewayError
from server.http.responses import JSONResponse
from server.http.tenancy import TenantNotFound, Tenants

router = APIRouter()


class TenantExists(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "tenant_exists"


class KeyNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "key_not_found"


class CreateTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    limits: dict[str, float] = Field(default_factory=dict)


class UpdateTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: dict[str, float]


def _tenant_card(tenants: Tenants, name: str, keys: list[Any], adapters: int) -> dict[str, Any]:
    limits = tenants.limits(name)
    return {
        "name": name,
        "object": "tenant",
        "created": tenants.created_at(name),
        "limits": {
            "max_concurrent": limits.max_concurrent,
            "requests_per_second": limits.requests_per_second,
            "max_adapters": limits.max_adapters,
            "max_upload_bytes": limits.max_upload_bytes,
            "max_file_bytes": limits.max_file_bytes,
            "max_queued_jobs": limits.max_queued_jobs,
            "max_pinned": limits.max_pinned,
            "max_merges": limits.max_merges,
            "weight": limits.weight,
            "max_training_seconds": limits.max_training_seconds,
        },
        "adapters": adapters,
        "in_flight": tenants.in_flight(name),
        "keys": [{"id": key.key_id, "created": key.created_at} for key in keys],
    }


@router.post("/v1/tenants", status_code=201, response_model=None)
async def create_tenant(
    body: CreateTenant, tenants: TenantsDep, keyring: KeyRingDep, registry: RegistryDep, _: AdminDep
) -> JSONResponse:
    issued, key_row = keyring.mint(body.name)
    if not await tenants.create(body.name, body.limits, first_key=key_row):
        raise TenantExists(f"tenant '{body.name}' already exists", param="name")
    keyring.remember(key_row)
    card = _tenant_card(tenants, body.name, keyring.keys_of(body.name), 0)
    card["api_key"] = issued.key  # shown this once; only its hash is kept
    return JSONResponse(card, status_code=201)


@router.get("/v1/tenants", response_model=None)
async def list_tenants(tenants: TenantsDep, keyring: KeyRingDep, registry: RegistryDep, _: AdminDep) -> JSONResponse:
    data = [_tenant_card(tenants, n, keyring.keys_of(n), registry.count(n)) for n in tenants.names()]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/tenants/{name}", response_model=None)
async def get_tenant(
    name: str, tenants: TenantsDep, keyring: KeyRingDep, registry: RegistryDep, _: AdminDep
) -> JSONResponse:
    tenants.limits(name)
    return JSONResponse(_tenant_card(tenants, name, keyring.keys_of(name), registry.count(name)))


@router.patch("/v1/tenants/{name}", response_model=None)
async def update_tenant(
    name: str, body: UpdateTenant, tenants: TenantsDep, keyring: KeyRingDep, registry: RegistryDep, _: AdminDep
) -> JSONResponse:
    await tenants.update(name, body.limits)
    return JSONResponse(_tenant_card(tenants, name, keyring.keys_of(name), registry.count(name)))


@router.delete("/v1/tenants/{name}", response_model=None)
async def delete_tenant(name: str, request: Request, _: AdminDep) -> JSONResponse:
    """The tenant and everything it owns, on every gateway of the catalog (server/admin/tenant_deletion.py)."""
    return JSONResponse(await tenant_deletion.delete_tenant(request.app.state, name))


@router.post("/v1/tenants/{name}/keys", status_code=201, response_model=None)
async def add_key(name: str, tenants: TenantsDep, keyring: KeyRingDep, _: AdminDep) -> JSONResponse:
    if not tenants.exists(name):
        raise TenantNotFound(name)
    issued = await keyring.issue(name)
    return JSONResponse(
        {"id": issued.key_id, "object": "api_key", "created": issued.created_at, "api_key": issued.key}, status_code=201
    )


@router.delete("/v1/tenants/{name}/keys/{key_id}", response_model=None)
async def revoke_key(name: str, key_id: str, tenants: TenantsDep, keyring: KeyRingDep, _: AdminDep) -> JSONResponse:
    if not tenants.exists(name):
        raise TenantNotFound(name)
    if not await keyring.revoke(name, key_id):
        raise KeyNotFound(f"tenant '{name}' has no key '{key_id[:64]}'", param="key_id")
    return JSONResponse({"id": key_id, "object": "api_key", "deleted": True})

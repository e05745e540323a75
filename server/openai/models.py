"""GET /v1/models and GET /v1/models/{name}: what this caller may use."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from adapters.registry import AdapterEntry, Registry
from server.http.auth import Principal
from server.http.deps import PrincipalDep, RegistryDep
from server.http.responses import JSONResponse

router = APIRouter()

OWNER = "lora-gateway"


def _card(registry: Registry, entry: AdapterEntry, principal: Principal) -> dict[str, Any]:
    is_base = entry is registry.base
    # The admin names a tenant's adapter "tenant/name"; a tenant sees its own by plain name.
    shown = entry.qualified_name if principal.admin else entry.name
    # vLLM puts the adapter's path in `root`; server paths are not for callers.
    return {
        "id": shown,
        "object": "model",
        "created": int(registry.started_at if is_base else entry.registered_at),
        "owned_by": OWNER if not entry.owner else entry.owner,
        "root": shown,
        "parent": None if is_base else registry.base_name,
    }


@router.get("/v1/models", response_model=None)
async def list_models(registry: RegistryDep, principal: PrincipalDep) -> JSONResponse:
    entries = [registry.base, *registry.entries(principal.visible_owners)]
    if principal.tenant is not None:
        # A tenant's own adapter hides a shared one of the same name, as it does when called.
        own = {e.name for e in entries if e.owner == principal.tenant}
        entries = [e for e in entries if e.owner == principal.tenant or e.name not in own]
    return JSONResponse({"object": "list", "data": [_card(registry, e, principal) for e in entries]})


@router.get("/v1/models/{name:path}", response_model=None)
async def get_model(name: str, registry: RegistryDep, principal: PrincipalDep) -> JSONResponse:
    entry = registry.resolve(name, tenant=principal.tenant, admin=principal.admin)
    return JSONResponse(_card(registry, entry, principal))

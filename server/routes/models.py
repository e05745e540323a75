"""GET /v1/models and GET /v1/models/{name}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from adapters.registry import AdapterEntry, Registry
from server.deps import RegistryDep
from server.responses import JSONResponse

router = APIRouter()

OWNER = "lora-gateway"


def _base_card(registry: Registry, created: int) -> dict[str, Any]:
    return {"id": registry.base_name, "object": "model", "created": created, "owned_by": OWNER,
            "root": registry.base_name, "parent": None}


def _adapter_card(registry: Registry, entry: AdapterEntry) -> dict[str, Any]:
    # vLLM puts the adapter's path in `root`; server paths are not for callers.
    return {"id": entry.name, "object": "model", "created": int(entry.registered_at), "owned_by": OWNER,
            "root": entry.name, "parent": registry.base_name}


@router.get("/v1/models", response_model=None)
async def list_models(registry: RegistryDep) -> JSONResponse:
    created = int(registry.started_at)
    data = [_base_card(registry, created)]
    data += [_adapter_card(registry, entry) for entry in registry.entries()]
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{name:path}", response_model=None)
async def get_model(name: str, registry: RegistryDep) -> JSONResponse:
    if name == registry.base_name:
        return JSONResponse(_base_card(registry, int(registry.started_at)))
    return JSONResponse(_adapter_card(registry, registry.get(name)))

"""DELETE /v1/models/{model}: a tenant deletes a model one of its fine-tuning jobs made, as on OpenAI.

Another tenant's model is a 404, as on every route; the base model and shared adapters are the
gateway's, not the caller's (403); an adapter the tenant uploaded goes through DELETE
/v1/adapters/{name}, where it came in.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from adapters.fine_tuning_db import FineTuningRecords
from adapters.spec import SHARED
from server.http.deps import PrincipalDep, RegistryDep
from server.http.errors import GatewayError, InvalidRequest
from server.http.responses import JSONResponse

router = APIRouter()


class ModelNotDeletable(GatewayError):
    """A model the caller may use but does not own."""

    status_code = 403
    error_type = "permission_error"
    code = "model_not_deletable"


@router.delete("/v1/models/{name:path}", response_model=None)
async def delete_model(name: str, registry: RegistryDep, principal: PrincipalDep) -> JSONResponse:
    entry = registry.resolve(name, tenant=principal.tenant, admin=principal.admin)  # 404 if not visible
    if entry is registry.base:
        raise ModelNotDeletable(f"'{name}' is this server's base model; it cannot be deleted", param="model")
    if entry.owner == SHARED:
        raise ModelNotDeletable(
            f"'{name}' is a shared adapter, not a fine-tuned model of yours; only the admin removes it, "
            f"with DELETE /v1/adapters/{name}",
            param="model",
        )
    assert registry.catalog is not None  # the gateway always has one
    records = FineTuningRecords(registry.catalog)
    if not await asyncio.to_thread(records.made_by_job, entry.owner, entry.name):
        raise InvalidRequest(
            f"'{name}' was uploaded, not made by a fine-tuning job; delete it with DELETE /v1/adapters/{name}",
            param="model",
        )
    await registry.unregister(entry)
    return JSONResponse({"id": name, "object": "model", "deleted": True})

"""GET /v1/cluster (admin): the engine replicas and what each holds."""

from __future__ import annotations

import os
import socket

from fastapi import APIRouter, Request

from server.http.deps import AdminDep, RegistryDep
from server.http.responses import JSONResponse

router = APIRouter()


@router.get("/v1/cluster", response_model=None)
async def cluster(request: Request, registry: RegistryDep, _: AdminDep) -> JSONResponse:
    engine = request.app.state.engine
    if hasattr(engine, "cluster"):
        # Replicas know adapters by content; callers know them by name.
        names: dict[str, list[str]] = {}
        for entry in registry.entries():
            names.setdefault(entry.spec.content_hash, []).append(entry.qualified_name)
        replicas = [
            {**replica, "resident_adapters": sorted(n for h in replica["resident_adapters"] for n in names.get(h, []))}
            for replica in await engine.cluster()
        ]
    else:  # one in-process engine
        resident = [entry.qualified_name for entry in registry.entries() if entry.resident]
        replicas = [
            {
                "id": "local",
                "pid": os.getpid(),
                "node": socket.gethostname(),
                "resident_adapters": resident,
                "in_flight": sum(entry.in_flight for entry in [registry.base, *registry.entries()]),
                "healthy": engine.is_healthy,
            }
        ]
    return JSONResponse({"object": "list", "data": replicas})

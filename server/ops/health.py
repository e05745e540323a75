"""GET /health (the process is alive) and GET /ready (the engine can serve)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.http.errors import error_body
from server.http.responses import JSONResponse

router = APIRouter()


@router.get("/health", response_model=None)
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_model=None)
async def ready(request: Request) -> JSONResponse:
    state = request.app.state
    if not state.ready:
        return JSONResponse(
            error_body("the gateway is starting or draining", "service_unavailable_error", "not_ready"), status_code=503
        )
    if not state.engine.is_healthy:
        return JSONResponse(
            error_body("the inference engine has stopped", "service_unavailable_error", "engine_unavailable"),
            status_code=503,
        )
    return JSONResponse({"status": "ready", "resident_adapters": state.registry.resident_count})

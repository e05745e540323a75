"""GET /v1/usage: recent requests, tokens and latency per model, for the console's charts.

A tenant sees its own requests only, the admin everyone's; the window is server/ops/usage.py's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from adapters.spec import SHARED
from server.http.deps import PrincipalDep
from server.http.responses import JSONResponse
from server.ops.usage import ModelKey

router = APIRouter()


@router.get("/v1/usage", response_model=None)
async def get_usage(
    request: Request,
    principal: PrincipalDep,
    minutes: Annotated[float | None, Query(gt=0, le=60, description="the last this many minutes")] = None,
) -> JSONResponse:
    """Per model this caller may see: request rate, tokens, p50 and p99 latency, and one point per bucket."""
    tenant = principal.tenant

    def visible(caller: str | None, model: ModelKey) -> bool:
        if principal.admin:
            return True
        return caller == tenant and model.owner in (SHARED, tenant)

    report = request.app.state.usage.report(visible, qualified=principal.admin, minutes=minutes)
    return JSONResponse(report)

"""OpenAI's Batch API: create, retrieve, list and cancel batches. Another tenant's batch answers 404.

The router's lifespan opens batches (`server/batches/service.py`) beside the files API, which
holds their input and output files, and runs the batch runner.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Query, Request

from server.batches.protocol import CreateBatch, batch_card
from server.batches.service import Batches, open_batches
from server.finetune.jobs_router import list_body
from server.http.deps import PrincipalDep
from server.http.errors import GatewayError
from server.http.responses import JSONResponse

CANCEL_WAIT_SECONDS = 10.0


class BatchesOff(GatewayError):
    status_code = 503
    error_type = "service_unavailable_error"
    code = "batches_unavailable"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    fine_tuning = getattr(app.state, "fine_tuning", None)  # opened by the files API's lifespan, before this one
    batches = None
    if fine_tuning is not None:
        batches = open_batches(app.state.settings, fine_tuning.files, app.state.tenants, app.state.generator, app)
        batches.start()
    app.state.batches = batches
    try:
        yield
    finally:
        if batches is not None:
            await batches.close()


router = APIRouter(lifespan=lifespan)


async def get_batches(request: Request) -> Batches:
    batches = getattr(request.app.state, "batches", None)
    if batches is None:
        raise BatchesOff("batches are off: the files API is off, as the base model's folder is unknown to this gateway")
    return batches


BatchesDep = Annotated[Batches, Depends(get_batches)]
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/v1/batches", response_model=None)
async def create_batch(body: CreateBatch, batches: BatchesDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(batch_card(await batches.create(body, principal)))


@router.get("/v1/batches", response_model=None)
async def list_batches(
    batches: BatchesDep, principal: PrincipalDep, after: str | None = None, limit: Limit = 20
) -> JSONResponse:
    return JSONResponse(list_body(await batches.list(principal, after, limit), batch_card))


@router.get("/v1/batches/{batch_id}", response_model=None)
async def get_batch(batch_id: str, batches: BatchesDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(batch_card(await batches.get(batch_id, principal)))


@router.post("/v1/batches/{batch_id}/cancel", response_model=None)
async def cancel_batch(batch_id: str, batches: BatchesDep, principal: PrincipalDep) -> JSONResponse:
    """Stops a running batch within seconds, keeping what was done; answers once it has stopped here,
    or after 10 s when another gateway runs it (then `cancelling`, and `cancelled` soon after)."""
    row = await batches.get(batch_id, principal)
    await batches.request_cancel(row)
    if batches.runner.stop_batch(batch_id):
        await batches.runner.wait_finished(batch_id, CANCEL_WAIT_SECONDS)
    else:
        for _ in range(int(CANCEL_WAIT_SECONDS * 4)):
            if (row := await batches.get(batch_id, principal)).status != "cancelling":
                break
            await asyncio.sleep(0.25)
    return JSONResponse(batch_card(await batches.get(batch_id, principal)))

"""OpenAI's fine-tuning jobs API: create, list, retrieve, cancel, events and checkpoints.

The router's lifespan opens fine-tuning (`server/finetune/service.py`) and runs its scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request

from adapters.fine_tuning_db import Page
from server.finetune.jobs import CreateJob, event_card, job_card
from server.finetune.service import FineTuning, open_fine_tuning
from server.http.auth import Principal
from server.http.deps import PrincipalDep, TenantsDep
from server.http.errors import GatewayError
from server.http.responses import JSONResponse

CANCEL_WAIT_SECONDS = 10.0


class FineTuningOff(GatewayError):
    status_code = 503
    error_type = "service_unavailable_error"
    code = "fine_tuning_unavailable"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    fine_tuning = None
    if (base_dir := settings.base_model_dir()) is not None:
        fine_tuning = open_fine_tuning(settings, app.state.registry, app.state.tenants, base_dir, app.state.metrics)
        fine_tuning.start()
    app.state.fine_tuning = fine_tuning
    try:
        yield
    finally:
        if fine_tuning is not None:
            await fine_tuning.close()


router = APIRouter(lifespan=lifespan)


async def get_fine_tuning(request: Request) -> FineTuning:
    fine_tuning = getattr(request.app.state, "fine_tuning", None)
    if fine_tuning is None:
        raise FineTuningOff("fine-tuning is off: the base model's folder is unknown to this gateway")
    return fine_tuning


FineTuningDep = Annotated[FineTuning, Depends(get_fine_tuning)]
Limit = Annotated[int, Query(ge=1, le=100)]


def list_body(page: Page, card) -> dict[str, Any]:
    data = [card(row) for row in page.rows]
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": page.has_more}
    if data:
        body["first_id"], body["last_id"] = data[0]["id"], data[-1]["id"]
    return body


def checkpoint_card(fine_tuned_model: str, row) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": int(row.created_at),
        "fine_tuned_model_checkpoint": f"{fine_tuned_model}:ckpt-step-{row.step}",
        "fine_tuning_job_id": row.job_id,
        "metrics": row.metrics,
        "step_number": row.step,
    }


@router.post("/v1/fine_tuning/jobs", response_model=None)
async def create_job(
    body: CreateJob, fine_tuning: FineTuningDep, principal: PrincipalDep, tenants: TenantsDep
) -> JSONResponse:
    """Create a job; the tenant's rate and concurrency are counted first, its queued jobs as the row is written."""
    with tenants.admitted(principal.tenant):
        row = await fine_tuning.jobs.create(body, principal)
    fine_tuning.scheduler.wake()
    return JSONResponse(job_card(row))


@router.get("/v1/fine_tuning/jobs", response_model=None)
async def list_jobs(
    fine_tuning: FineTuningDep, principal: PrincipalDep, after: str | None = None, limit: Limit = 20
) -> JSONResponse:
    return JSONResponse(list_body(await fine_tuning.jobs.list(principal, after, limit), job_card))


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=None)
async def get_job(job_id: str, fine_tuning: FineTuningDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(job_card(await fine_tuning.jobs.get(job_id, principal)))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=None)
async def cancel_job(
    job_id: str, fine_tuning: FineTuningDep, principal: PrincipalDep, tenants: TenantsDep
) -> JSONResponse:
    """Stops a running job within seconds; answers once it has stopped here, or after 10 s elsewhere."""
    with tenants.admitted(principal.tenant):
        return await _cancel_job(job_id, fine_tuning, principal)


async def _cancel_job(job_id: str, fine_tuning: FineTuning, principal: Principal) -> JSONResponse:
    row = await fine_tuning.jobs.request_cancel(await fine_tuning.jobs.get(job_id, principal))
    if row.status == "running":
        if fine_tuning.scheduler.stop_job(job_id):
            await fine_tuning.scheduler.wait_finished(job_id, CANCEL_WAIT_SECONDS)
        else:
            # Another gateway runs it, and looks for the request every second.
            for _ in range(int(CANCEL_WAIT_SECONDS * 2)):
                await asyncio.sleep(0.5)
                if (row := await fine_tuning.jobs.get(job_id, principal)).status != "running":
                    break
        row = await fine_tuning.jobs.get(job_id, principal)
    return JSONResponse(job_card(row))


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=None)
async def list_events(
    job_id: str, fine_tuning: FineTuningDep, principal: PrincipalDep, after: str | None = None, limit: Limit = 20
) -> JSONResponse:
    job = await fine_tuning.jobs.get(job_id, principal)
    page = await asyncio.to_thread(fine_tuning.jobs.records.events, job.id, after, limit)
    return JSONResponse(list_body(page, event_card))


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=None)
async def list_checkpoints(
    job_id: str, fine_tuning: FineTuningDep, principal: PrincipalDep, after: str | None = None, limit: Limit = 10
) -> JSONResponse:
    job = await fine_tuning.jobs.get(job_id, principal)
    page = await asyncio.to_thread(fine_tuning.jobs.records.checkpoints, job.id, after, limit)
    name = job.request["fine_tuned_model"]
    return JSONResponse(list_body(page, lambda row: checkpoint_card(name, row)))

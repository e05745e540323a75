"""GET and PATCH /v1/scheduling (admin): how generation shares the engine, and each tenant's place."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from server.http.deps import AdminDep
from server.http.responses import JSONResponse
from server.openai.fairness import FairQueue

router = APIRouter()


class UpdateScheduling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["fair", "fcfs"]


def _card(queue: FairQueue) -> dict:
    return {
        "object": "scheduling",
        "policy": queue.policy,
        "depth": queue.depth,
        "in_flight": queue.in_flight,
        "waiting": queue.waiting,
        "tenants": [
            {"tenant": key, "virtual_tokens": round(counter, 3), "waiting": queue.waiting_for(key)}
            for key, counter in sorted(queue.counters.items())
        ],
    }


@router.get("/v1/scheduling", response_model=None)
async def show(request: Request, _: AdminDep) -> JSONResponse:
    return JSONResponse(_card(request.app.state.generator.fair_queue))


@router.patch("/v1/scheduling", response_model=None)
async def update(body: UpdateScheduling, request: Request, _: AdminDep) -> JSONResponse:
    """Switch this gateway's policy now (until it restarts; --scheduling sets it at start)."""
    queue: FairQueue = request.app.state.generator.fair_queue
    queue.set_policy(body.policy)
    return JSONResponse(_card(queue))

"""POST /v1/responses, and the stored responses' routes: GET, its input items, DELETE.

The router's lifespan opens the stored responses on the gateway's catalog and prunes the expired
ones hourly. Another tenant's response answers 404, as one that does not exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request, Response

from adapters.responses_db import ResponseRecords
from server.http.deps import PrincipalDep, RecordDep
from server.http.errors import InvalidRequest
from server.http.responses import JSONResponse
from server.openai.generation import Generator, GeneratorDep
from server.openai.responses.protocol import ResponsesRequest
from server.openai.responses.serving import respond
from server.openai.responses.store import ResponseStore, ResponseStoreDep


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = app.state.settings
    catalog = app.state.registry.catalog
    store = ResponseStore(ResponseRecords(catalog), app.state.tenants, settings.response_retention_days)
    app.state.response_store = store
    pruning = asyncio.create_task(store.prune_forever())
    try:
        yield
    finally:
        pruning.cancel()
        await asyncio.gather(pruning, return_exceptions=True)


router = APIRouter(lifespan=lifespan)
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/v1/responses", response_model=None)
async def create_response(
    request: Request,
    body: ResponsesRequest,
    generator: GeneratorDep,
    principal: PrincipalDep,
    record: RecordDep,
    store: ResponseStoreDep,
) -> Response:
    return await respond(request, body, generator, principal, record, store)


async def create_response_in_batch(
    request: Any, body: ResponsesRequest, generator: Generator, principal: Any, record: Any
) -> Response:
    """A batch line's response: never stored, as OpenAI's batches do not store theirs."""
    unstored = body.model_copy(update={"store": False})
    return await respond(request, unstored, generator, principal, record, request.app.state.response_store)


@router.get("/v1/responses/{response_id}", response_model=None)
async def get_response(response_id: str, store: ResponseStoreDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse((await store.get(response_id, principal)).response)


@router.get("/v1/responses/{response_id}/input_items", response_model=None)
async def list_input_items(
    response_id: str,
    store: ResponseStoreDep,
    principal: PrincipalDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    """The response's own input items, newest first by default, as OpenAI lists them."""
    items = (await store.get(response_id, principal)).input_items
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidRequest(f"no input item '{after[:64]}' in response {response_id[:64]}", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


@router.delete("/v1/responses/{response_id}", response_model=None)
async def delete_response(response_id: str, store: ResponseStoreDep, principal: PrincipalDep) -> JSONResponse:
    await store.delete(response_id, principal)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})

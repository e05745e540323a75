"""Stored responses for the routes: owned by a tenant, kept for --response-retention-days, counted.

A tenant's count is checked twice, as the other quotas are: in this process before generating
(stored plus being generated here, under the owner's lock, as adapters/quota.py does), so that a tenant at
its limit is told before any work; and in the catalog's insert (adapters/responses_db.py), which
holds across gateways. Another tenant's response is a 404, as one that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from adapters.errors import Unavailable
from adapters.responses_db import ResponseRecords, ResponsesQuotaExceeded, StoredResponse
from server.http.auth import Principal
from server.http.errors import GatewayError
from server.http.tenancy import TenantNotFound, Tenants

logger = logging.getLogger(__name__)

PRUNE_SECONDS = 3600.0


class ResponseNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "response_not_found"

    def __init__(self, response_id: str, param: str = "response_id"):
        super().__init__(f"Response with id '{response_id[:64]}' not found.", param=param)


@dataclass(frozen=True)
class Reservation:
    """A stored response held for a request: its owner's limit then (None: none), and how to give it back."""

    limit: int | None
    release: Callable[[], None]


def _nothing() -> None:
    pass


class ResponseStore:
    """The catalog's stored responses, as one gateway's routes use them."""

    def __init__(self, records: ResponseRecords, tenants: Tenants | None, retention_days: float):
        self.records = records
        self.tenants = tenants
        self.retention_seconds = retention_days * 86400.0
        self._held: dict[str, int] = {}  # responses being generated, per owner, that will be stored
        self._locks: dict[str, asyncio.Lock] = {}

    def _limit(self, principal: Principal) -> int | None:
        if principal.tenant is None or self.tenants is None:
            return None  # the admin's responses are not counted
        try:
            return self.tenants.limits(principal.tenant).max_stored_responses
        except TenantNotFound:
            return None  # deleted meanwhile: the insert finds it gone

    async def reserve(self, principal: Principal) -> Reservation:
        """Hold one of the caller's stored responses while it is generated; 429 when none is left.

        Checked and taken under the owner's lock: stored (in the catalog) plus held here.
        """
        limit = self._limit(principal)
        if limit is None:
            return Reservation(None, _nothing)
        owner = principal.owner
        async with self._locks.setdefault(owner, asyncio.Lock()):
            stored = await asyncio.to_thread(self.records.count, owner, time.time())
            in_use = stored + self._held.get(owner, 0)
            if in_use + 1 > limit:
                raise ResponsesQuotaExceeded(in_use, limit)
            self._held[owner] = self._held.get(owner, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._held[owner] -= 1
                if self._held[owner] <= 0:
                    del self._held[owner]

        return Reservation(limit, release)

    async def save(self, principal: Principal, response: dict, input_items: list, context: list, limit: int | None):
        now = time.time()
        row = StoredResponse(
            id=response["id"],
            owner=principal.owner,
            created_at=float(response["created_at"]),
            expires_at=now + self.retention_seconds,
            response=response,
            input_items=input_items,
            context=context,
        )
        await asyncio.to_thread(self.records.add, row, limit, now)

    async def get(self, response_id: str, principal: Principal, param: str = "response_id") -> StoredResponse:
        row = await asyncio.to_thread(self.records.get, response_id, time.time())
        if row is None or not (principal.admin or row.owner == principal.owner):
            raise ResponseNotFound(response_id, param)
        return row

    async def delete(self, response_id: str, principal: Principal) -> None:
        await self.get(response_id, principal)
        if not await asyncio.to_thread(self.records.delete, response_id):
            raise ResponseNotFound(response_id)

    async def prune_forever(self, every: float = PRUNE_SECONDS) -> None:
        """Delete expired responses now and then, until cancelled."""
        while True:
            with contextlib.suppress(Unavailable):
                pruned = await asyncio.to_thread(self.records.prune, time.time())
                if pruned:
                    logger.info("deleted %d expired stored responses", pruned)
            await asyncio.sleep(every)


def get_response_store(request: Request) -> ResponseStore:
    return request.app.state.response_store


ResponseStoreDep = Annotated[ResponseStore, Depends(get_response_store)]

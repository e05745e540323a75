"""Per-owner quotas taken in one step: checked and reserved under the owner's lock, in this process.

A route reserves what it will consume (one adapter, some bytes) before its slow work, so that
twenty uploads at once against a limit of two start two conversions, not twenty. The catalog
checks again in the transaction that writes the row (adapters/database.py,
adapters/fine_tuning_db.py), which is what holds across gateways sharing one catalog; the
reservation only keeps one process from working for requests the catalog would refuse.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from adapters.errors import QuotaExceeded


class Reservations:
    """Amounts reserved per owner while the work that will consume them runs."""

    def __init__(self) -> None:
        self._held: defaultdict[str, int] = defaultdict(int)
        self._locks: dict[str, asyncio.Lock] = {}

    def held(self, owner: str) -> int:
        return self._held.get(owner, 0)

    @asynccontextmanager
    async def hold(
        self,
        owner: str,
        amount: int,
        limit: int | None,
        used: Callable[[], Awaitable[int] | int],
        refuse: Callable[[int], QuotaExceeded],
    ) -> AsyncIterator[None]:
        """Reserve `amount` of owner's `limit` (None: no limit) while the block runs.

        `used()` is what the owner has consumed already; `refuse(in_use)` is raised, with nothing
        reserved, when `in_use` plus `amount` would pass the limit. Reservations still held count
        as used, so a request counted by both for a moment is refused rather than let through.
        """
        if limit is None:
            yield
            return
        lock = self._locks.setdefault(owner, asyncio.Lock())
        async with lock:
            consumed = used()
            if not isinstance(consumed, int):
                consumed = await consumed
            in_use = consumed + self._held[owner]
            if in_use + amount > limit:
                raise refuse(in_use)
            self._held[owner] += amount
        try:
            yield
        finally:
            self._held[owner] -= amount
            if self._held[owner] <= 0:
                del self._held[owner]  # the lock stays: one per owner that ever reserved

"""Keep this process's view of the catalog current with what other gateways write.

A background task waits for PostgreSQL's NOTIFY (or just the poll interval on SQLite), reads the
catalog's change counter, and on a change reads the rows the change log names since the version
it applied last (adapters/catalog_changes.py) and applies only those to the registry, the tenants
and the key ring: with 10,000 adapters a registration elsewhere costs one row here, not 10,000.
At start, when it fell behind past what the log keeps, or after a bulk change, it loads a whole
snapshot instead. Requests never wait for the database: they route from memory. While the
database is unreachable the last state keeps serving, and the task keeps trying.

A tenant deleted through another gateway (or deleted and made again) is handed to
`on_tenant_gone`, which drops what this process alone holds of it: merges, usage, cached files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from adapters.catalog_changes import Changes, read_changes
from adapters.database import Database
from adapters.errors import CatalogUnavailable
from adapters.registry import Registry
from server.http.auth import KeyRing
from server.http.tenancy import Tenants

logger = logging.getLogger(__name__)


class CatalogSync:
    """Applies changes made through other processes within about one poll interval."""

    def __init__(
        self,
        catalog: Database,
        registry: Registry,
        tenants: Tenants,
        keyring: KeyRing,
        poll_seconds: float,
        on_applied: Callable[[int], None] | None = None,
        on_tenant_gone: Callable[[str], Awaitable[None]] | None = None,
    ):
        self.catalog = catalog
        self.registry = registry
        self.tenants = tenants
        self.keyring = keyring
        self.poll_seconds = poll_seconds
        self.on_applied = on_applied
        self.on_tenant_gone = on_tenant_gone
        self.seen_version = -1
        self.snapshots = 0  # whole snapshots loaded: at start, and when the change log cannot say

    async def run(self) -> None:
        healthy = True
        while True:
            try:
                await self.check()
                if not healthy:
                    logger.info("catalog database reachable again; changes are applied again")
                healthy = True
            except CatalogUnavailable:
                if healthy:
                    logger.warning("catalog database unreachable; serving the last known adapters and keys")
                healthy = False
            await asyncio.to_thread(self.catalog.wait_for_change, self.poll_seconds)

    async def check(self) -> bool:
        """Apply the catalog if it changed since the last look; True when something was applied."""
        changes = await asyncio.to_thread(self._look, self.seen_version)
        if changes is None:
            return await self._apply_snapshot()
        if changes.version == self.seen_version:
            return False
        if changes.version < self.catalog.written_version:
            return False  # read before one of this process's own writes: the next look has it
        gone = self.tenants.apply_changes(changes.tenants)
        self.keyring.apply_changes(changes.keys)
        await self.registry.apply_changes(changes.adapters)
        await self._applied(changes.version, gone)
        return True

    def _look(self, seen: int) -> Changes | None:
        """In a worker thread: nothing new (`seen` again), the rows changed since, or None for a snapshot."""
        version = self.catalog.version()
        if version == seen:
            return Changes(version)
        return None if seen < 0 else read_changes(self.catalog, seen)

    async def _apply_snapshot(self) -> bool:
        self.snapshots += 1
        snapshot = await asyncio.to_thread(self.catalog.snapshot)
        if snapshot.version < self.catalog.written_version:
            return False
        gone = self.tenants.apply(snapshot.tenants)
        self.keyring.apply(snapshot.keys)
        await self.registry.apply(snapshot.adapters)
        await self._applied(snapshot.version, gone)
        return True

    async def _applied(self, version: int, gone: set[str]) -> None:
        self.seen_version = version
        if self.on_tenant_gone is not None:
            for name in sorted(gone):
                await self.on_tenant_gone(name)
        if self.on_applied is not None:
            self.on_applied(version)

"""Keep this process's view of the catalog current with what other gateways write.

A background task waits for PostgreSQL's NOTIFY (or just the poll interval on SQLite), reads the
catalog's change counter, and on a change loads one snapshot and applies it to the registry, the
tenants and the key ring. Requests never wait for the database: they route from memory. While
the database is unreachable the last snapshot keeps serving, and the task keeps trying.

A tenant deleted through another gateway (or deleted and made again) is handed to
`on_tenant_gone`, which drops what this process alone holds of it: merges, usage, cached files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

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
        version = await asyncio.to_thread(self.catalog.version)
        if version == self.seen_version:
            return False
        snapshot = await asyncio.to_thread(self.catalog.snapshot)
        if snapshot.version < self.catalog.written_version:
            return False  # read before one of this process's own writes: the next look has it
        gone = self.tenants.apply(snapshot.tenants)
        self.keyring.apply(snapshot.keys)
        await self.registry.apply(snapshot.adapters)
        self.seen_version = snapshot.version
        if self.on_tenant_gone is not None:
            for name in sorted(gone):
                await self.on_tenant_gone(name)
        if self.on_applied is not None:
            self.on_applied(snapshot.version)
        return True

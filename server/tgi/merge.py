"""LoRAX's `merged_adapters`: adapters composed per request, then cached like any adapter.

The composition is adapters/compose.py's, the code behind `POST /v1/adapters` with `compose`, so
a merge answers exactly as the same recipe registered there does. A composed adapter is kept
under its owner, its recipe and its inputs' content hashes (`Recipe.cache_key`): the next request
with the same recipe over the same files reuses it, and a changed input makes a new one. It is
not in the catalog, so no tenant lists or names it; it goes through the registry's lease like
any adapter, so it sits in the engine's LRU cache and is evicted from it like any other.

A tenant keeps at most its `max_merges`: a new merge past it replaces that tenant's least
recently used one, never another tenant's, and a tenant's merges are checked, evicted and
composed under one lock of its own. All tenants together keep at most `max_entries`; past it
the least recently used merge of the tenant holding the most goes. A merge with requests in
flight is never evicted: when all of a tenant's are busy, its new one is refused (429). An
evicted merge is unregistered, and its store folder and object are deleted unless something
else holds the same content. A deleted tenant's merges go at once (`drop_owner`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from adapters.compose import Recipe, compose
from adapters.errors import AdapterNotFound, CatalogUnavailable, InvalidComposition, QuotaExceeded, StoreUnavailable
from adapters.registry import AdapterEntry, Registry
from adapters.spec import AdapterSpec
from adapters.store import adapter_blob_key
from server.http.auth import Principal
from server.http.errors import ModelNotFound

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 16
Key = tuple[str, str]  # (owner, recipe cache key)


class MergedAdapterCache:
    """Composed adapters by owner and recipe, most recently used last."""

    def __init__(
        self,
        registry: Registry,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_merges: Callable[[str], int | None] = lambda owner: None,
    ):
        self.registry = registry
        self.max_entries = max_entries
        self.max_merges = max_merges  # an owner's limit (its tenant's max_merges); None: only max_entries
        self._entries: OrderedDict[Key, AdapterEntry] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}  # one per owner
        self.composed = 0  # compositions run, for tests and logs
        self.files_deleted = 0  # evicted merges whose store folder went with them

    def entries(self) -> list[AdapterEntry]:
        return list(self._entries.values())

    def held_hashes(self) -> set[str]:
        """The content of every cached merge, which the store sweep must keep."""
        return {entry.spec.content_hash for entry in self._entries.values()}

    async def drop_owner(self, owner: str) -> set[str]:
        """Forget an owner's merges (its tenant was deleted); returns their content hashes.

        Each is unregistered: requests in flight finish first, as for an evicted merge.
        """
        dropped = [key for key in self._entries if key[0] == owner]
        hashes = set()
        for key in dropped:
            entry = self._entries.pop(key)
            hashes.add(entry.spec.content_hash)
            await self.registry.unregister(entry)
        return hashes

    async def get(self, principal: Principal, ids: list[str], recipe: Recipe) -> AdapterEntry:
        """The composed adapter for this caller; 404 for an input it may not use, as for a missing one."""
        inputs = [self._input(principal, name, i) for i, name in enumerate(ids)]
        owner = principal.owner
        key = (owner, recipe.cache_key([entry.spec.content_hash for entry in inputs]))
        if (entry := self._current(key)) is not None:
            return entry
        async with self._locks.setdefault(owner, asyncio.Lock()):
            if (entry := self._current(key)) is None:
                await self._make_room(owner)
                entry = await self._compose(key, inputs, recipe, ids)
        await self._evict()
        return entry

    def owned(self, owner: str) -> list[Key]:
        """The owner's merges, least recently used first."""
        return [key for key in self._entries if key[0] == owner]

    async def _make_room(self, owner: str) -> None:
        """Below the owner's limit before it composes: evict its own least recently used idle merges."""
        limit = self.max_merges(owner)
        if limit is None:
            return
        while len(owned := self.owned(owner)) >= limit:
            idle = next((key for key in owned if self._entries[key].in_flight == 0), None)
            if idle is None:
                raise QuotaExceeded(
                    f"this tenant's {len(owned)} merged adapters (its max_merges is {limit}) all have requests "
                    "running; retry when one ends, or reuse one of their recipes",
                    limit="max_merges",
                    retry_after=1,
                )
            await self._drop(idle)

    def _current(self, key: Key) -> AdapterEntry | None:
        entry = self._entries.get(key)
        if entry is None or entry.retired:
            return None
        self._entries.move_to_end(key)
        return entry

    def _input(self, principal: Principal, name: str, index: int) -> AdapterEntry:
        try:
            entry = self.registry.resolve(name, tenant=principal.tenant, admin=principal.admin)
        except AdapterNotFound:
            error = ModelNotFound(name)
            error.param = f"parameters.merged_adapters.ids.{index}"
            raise error from None
        if entry is self.registry.base:
            raise InvalidComposition(
                f"'{name[:64]}' is the base model, which cannot be merged; name adapters",
                param=f"merged_adapters.ids.{index}",
            )
        return entry

    async def _compose(self, key: Key, inputs: list[AdapterEntry], recipe: Recipe, ids: list[str]) -> AdapterEntry:
        spec = await self.registry.work.run(self._build, inputs, recipe, ids)
        owner, digest = key
        entry = AdapterEntry(owner, f"merged-{digest[:16]}", spec, self._new_adapter_id())
        # The engine must accept it before any request uses it: a lease loads it through add_lora.
        async with self.registry.lease(entry):
            pass
        self._entries[key] = entry
        self.composed += 1
        logger.info("composed merged adapter %s (%s of %d adapters)", entry.qualified_name, recipe.method, len(ids))
        return entry

    def _build(self, inputs: list[AdapterEntry], recipe: Recipe, ids: list[str]) -> AdapterSpec:
        store, rules = self.registry.store, self.registry.rules
        if store is None or rules is None:
            raise RuntimeError("this registry has no store")
        staging = store.new_staging()
        try:
            folders: list[Path] = [store.ensure_local(entry.spec.content_hash) for entry in inputs]
            compose(folders, recipe, staging, max_rank=rules.max_rank, names=ids)
            spec = rules.validate(staging)
            path = store.commit(staging, spec.content_hash)
        except BaseException:
            store.discard(staging)
            raise
        return replace(spec, path=path)

    def _new_adapter_id(self) -> int:
        # The engine caches adapters by integer id, so ids come from the registry's one counter.
        return self.registry.new_adapter_id()

    async def _evict(self) -> None:
        """Past `max_entries`: evict the least recently used idle merge of the owner holding the most."""
        while len(self._entries) > self.max_entries:
            held = Counter(owner for owner, _ in self._entries)
            idle = [key for key, entry in self._entries.items() if entry.in_flight == 0]
            if not idle:
                return
            await self._drop(max(idle, key=lambda key: held[key[0]]))  # the first of the largest: its LRU

    async def _drop(self, key: Key) -> None:
        """Unregister an idle merge, then delete its files unless other holders share its content."""
        victim = self._entries.pop(key)
        await self.registry.unregister(victim)
        content_hash = victim.spec.content_hash
        if content_hash in self.held_hashes() or content_hash in self.registry.held_hashes():
            return
        store, catalog = self.registry.store, self.registry.catalog
        if store is None:
            return
        try:
            if catalog is not None and content_hash in await asyncio.to_thread(catalog.content_hashes):
                return  # registered as an adapter too (a composition of the same recipe)
            # Newer than anything made so far: the folder goes whatever its time.
            await asyncio.to_thread(store.remove_local, content_hash, time.time() + 60)
            if store.blobs is not None:
                await asyncio.to_thread(store.blobs.delete, adapter_blob_key(content_hash))
        except (CatalogUnavailable, StoreUnavailable):
            return  # the store sweep removes what is left, as nothing names it
        self.files_deleted += 1
        logger.info("evicted merged adapter %s and deleted its files", victim.qualified_name)

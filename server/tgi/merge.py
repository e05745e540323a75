"""LoRAX's `merged_adapters`: adapters composed per request, then cached like any adapter.

The composition is adapters/compose.py's, the code behind `POST /v1/adapters` with `compose`, so
a merge answers exactly as the same recipe registered there does. A composed adapter is kept
under its owner, its recipe and its inputs' content hashes (`Recipe.cache_key`): the next request
with the same recipe over the same files reuses it, and a changed input makes a new one. It is
not in the catalog, so no tenant lists or names it; it goes through the registry's lease like
any adapter, so it sits in the engine's LRU cache and is evicted from it like any other. At most
`max_entries` are kept; the least recently used beyond that is unregistered (after its requests
in flight finish). Its store folder and object are then the store sweep's (adapters/retention.py),
as nothing in the catalog names them. A deleted tenant's merges go at once (`drop_owner`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

from adapters.compose import Recipe, compose
from adapters.errors import AdapterNotFound, InvalidComposition
from adapters.registry import AdapterEntry, Registry
from adapters.spec import AdapterSpec
from server.http.auth import Principal
from server.http.errors import ModelNotFound

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 16
Key = tuple[str, str]  # (owner, recipe cache key)


class MergedAdapterCache:
    """Composed adapters by owner and recipe, most recently used last."""

    def __init__(self, registry: Registry, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.registry = registry
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, AdapterEntry] = OrderedDict()
        self._locks: dict[Key, asyncio.Lock] = {}
        self.composed = 0  # compositions run, for tests and logs

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
        key = (principal.owner, recipe.cache_key([entry.spec.content_hash for entry in inputs]))
        if (entry := self._current(key)) is not None:
            return entry
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if (entry := self._current(key)) is None:
                entry = await self._compose(key, inputs, recipe, ids)
        self._locks.pop(key, None)
        await self._evict()
        return entry

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
        spec = await asyncio.to_thread(self._build, inputs, recipe, ids)
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
        """Unregister the least recently used past the bound; ones with requests in flight wait their turn."""
        while len(self._entries) > self.max_entries:
            victim_key = next((k for k, e in self._entries.items() if e.in_flight == 0), None)
            if victim_key is None:
                return
            victim = self._entries.pop(victim_key)
            await self.registry.unregister(victim)

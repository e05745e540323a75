"""What the catalog lets go: a tenant's rows, in one transaction, and the stored objects no row names.

`purge_tenant` deletes a tenant and every row it owns, in every table (adapters on every base,
keys, files, fine-tuning jobs with their events and checkpoints, batches with their lines'
results, stored responses), in one transaction: on a failure nothing is deleted. Its SQL spans the tables of
adapters/database.py, adapters/fine_tuning_db.py, adapters/batches_db.py and adapters/responses_db.py, so it lives beside
them rather than in any one.

`StoreSweep` removes stored objects that nothing references: adapter folders in this process's
cache, and adapter, file and checkpoint objects in the shared store. Each gateway serves from its
own cache, so the rule (also in docs/operations.md) is:

- an object that a catalog row names (an adapter of any base, a file, a checkpoint) is kept;
- a folder this process holds (a registered, resident or leased adapter, a composed merge) is kept,
  and so is its shared object;
- an object newer than the grace period is kept: another gateway may have just uploaded it and not
  yet written its row (committing content that is stored already makes it new again);
- anything else is deleted. Another gateway's cache is its own to sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from adapters.batches_db import batch_lines_table, batches_table
from adapters.blobs import Blobs
from adapters.database import Database, adapters_table, keys_table, tenants_table
from adapters.errors import CatalogUnavailable, OwnerNotFound, StoreUnavailable
from adapters.fine_tuning_db import (
    CHECKPOINT_PREFIX,
    FILE_PREFIX,
    RUNNING,
    checkpoints_table,
    events_table,
    file_blob_key,
    files_table,
    jobs_table,
)
from adapters.responses_db import responses_table
from adapters.store import ADAPTER_PREFIX, AdapterStore, adapter_blob_key, content_hash_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PurgedTenant:
    """What a tenant's deletion took from the catalog, and the stored bytes that were theirs."""

    name: str
    adapters: int
    content_hashes: frozenset[str]  # its adapters' content, which other rows may still name
    file_ids: tuple[str, ...]
    jobs: int
    running_jobs: tuple[str, ...]
    checkpoint_keys: tuple[str, ...]
    batches: int = 0

    @property
    def blob_keys(self) -> list[str]:
        """Objects no other row can name: its files' bytes and its checkpoints."""
        return [file_blob_key(file_id) for file_id in self.file_ids] + list(self.checkpoint_keys)


def purge_tenant(catalog: Database, name: str) -> PurgedTenant:
    """Delete tenant `name` and every row it owns, in one transaction; OwnerNotFound when there is none."""
    owned_jobs = sa.select(jobs_table.c.id).where(jobs_table.c.owner == name)
    with catalog._write() as conn:
        # What it owns, for other gateways to drop, before its keys go with its row (ON DELETE CASCADE).
        catalog.log_owner(conn, name)
        # The tenant's row first: a write for it that holds it (Database.hold_owner) now waits for
        # this transaction and then finds it gone, or this one waits for that write to commit.
        if conn.execute(tenants_table.delete().where(tenants_table.c.name == name)).rowcount == 0:
            raise OwnerNotFound(name)
        jobs = conn.execute(sa.select(jobs_table.c.id, jobs_table.c.status).where(jobs_table.c.owner == name)).all()
        checkpoint_keys = conn.execute(
            sa.select(checkpoints_table.c.blob_key).where(checkpoints_table.c.job_id.in_(owned_jobs))
        ).scalars()
        checkpoint_keys = tuple(checkpoint_keys)
        file_ids = tuple(conn.execute(sa.select(files_table.c.id).where(files_table.c.owner == name)).scalars())
        hashes = conn.execute(sa.select(adapters_table.c.content_hash).where(adapters_table.c.owner == name))
        hashes = frozenset(hashes.scalars())
        conn.execute(events_table.delete().where(events_table.c.job_id.in_(owned_jobs)))
        conn.execute(checkpoints_table.delete().where(checkpoints_table.c.job_id.in_(owned_jobs)))
        conn.execute(jobs_table.delete().where(jobs_table.c.owner == name))
        conn.execute(files_table.delete().where(files_table.c.owner == name))
        owned_batches = sa.select(batches_table.c.id).where(batches_table.c.owner == name)
        conn.execute(batch_lines_table.delete().where(batch_lines_table.c.batch_id.in_(owned_batches)))
        batches = conn.execute(batches_table.delete().where(batches_table.c.owner == name)).rowcount
        conn.execute(responses_table.delete().where(responses_table.c.owner == name))
        adapters = conn.execute(adapters_table.delete().where(adapters_table.c.owner == name)).rowcount
        conn.execute(keys_table.delete().where(keys_table.c.tenant == name))
    return PurgedTenant(
        name=name,
        adapters=adapters,
        content_hashes=hashes,
        file_ids=file_ids,
        jobs=len(jobs),
        running_jobs=tuple(job_id for job_id, status in jobs if status == RUNNING),
        checkpoint_keys=checkpoint_keys,
        batches=batches,
    )


@dataclass(frozen=True)
class References:
    """Every stored object a catalog row names."""

    content_hashes: frozenset[str]  # adapters of every base
    blob_keys: frozenset[str]  # files' bytes and checkpoints

    def names(self, key: str) -> bool:
        digest = content_hash_of(key)
        return digest in self.content_hashes if digest is not None else key in self.blob_keys


def references(catalog: Database) -> References:
    """What the catalog names, read in one transaction."""
    with catalog._guard(), catalog.raw_engine.connect() as conn, conn.begin():
        hashes = frozenset(conn.execute(sa.select(adapters_table.c.content_hash).distinct()).scalars())
        files = conn.execute(sa.select(files_table.c.id)).scalars()
        checkpoints = conn.execute(sa.select(checkpoints_table.c.blob_key)).scalars()
        keys = frozenset([file_blob_key(file_id) for file_id in files] + list(checkpoints))
    return References(hashes, keys)


class StoreSweep:
    """Removes stored objects nothing references: the rule in this module's docstring."""

    def __init__(
        self,
        catalog: Database,
        store: AdapterStore | None,
        file_blobs: Blobs | None,
        grace_seconds: float,
        clock: Callable[[], float] = time.time,
    ):
        self.catalog = catalog
        self.store = store
        self.file_blobs = file_blobs
        self.grace_seconds = grace_seconds
        self.clock = clock
        # Each backend once, with the prefixes it holds: the shared store holds files too.
        self.shared: list[tuple[Blobs, tuple[str, ...]]] = []
        self.adapter_blobs = store.blobs if store is not None else None
        if self.adapter_blobs is not None:
            self.shared.append((self.adapter_blobs, (ADAPTER_PREFIX, FILE_PREFIX, CHECKPOINT_PREFIX)))
        if file_blobs is not None and file_blobs is not self.adapter_blobs:
            self.shared.append((file_blobs, (FILE_PREFIX, CHECKPOINT_PREFIX)))

    def sweep(self, held: set[str]) -> int:
        """One pass over this process's cache and the shared objects; how many were removed.

        `held`: content hashes this process holds (registered, resident, leased, merges).
        """
        removed = self.collect_local(held) + self.collect_shared(held)
        if removed:
            logger.info("store sweep removed %d unreferenced objects", removed)
        return removed

    def collect_local(self, held: set[str]) -> int:
        """Delete folders of this process's cache that nothing references."""
        if self.store is None:
            return 0
        candidates = [h for h, modified in self.store.local_objects() if h not in held and self._old(modified)]
        if not candidates:
            return 0
        named = references(self.catalog).content_hashes
        cutoff = self.clock() - self.grace_seconds
        return sum(self.store.remove_local(h, cutoff) for h in candidates if h not in named)

    def collect_shared(self, held: set[str]) -> int:
        """Delete shared adapter, file and checkpoint objects nothing references."""
        removed = 0
        named: References | None = None
        for blobs, prefixes in self.shared:
            listed = [item for prefix in prefixes for item in blobs.list(prefix)]
            candidates = [key for key, modified in listed if self._old(modified) and content_hash_of(key) not in held]
            if candidates and named is None:
                named = references(self.catalog)  # after listing: a row written meanwhile counts
            removed += sum(self._delete_if_old(blobs, key) for key in candidates if not named.names(key))
        return removed

    def remove_purged(self, purged: PurgedTenant, released: Iterable[str], held: set[str]) -> int:
        """After a tenant's rows are gone: remove its bytes; returns how many objects could not be removed.

        Its files' and checkpoints' objects go at once: no other row can name them. Its adapters'
        content, and `released` (its merges), go by the sweep's rule, since other rows may name
        the same content. What could not be removed (the store unreachable) stays for the sweep.
        """
        failed = 0
        if self.file_blobs is not None:
            for key in purged.blob_keys:
                try:
                    self.file_blobs.delete(key)
                except StoreUnavailable:
                    failed += 1
        candidates = (set(purged.content_hashes) | set(released)) - held
        if candidates and self.store is not None:
            try:
                candidates -= references(self.catalog).content_hashes
            except CatalogUnavailable:
                return failed + len(candidates)  # whether other rows name them is unknown: the sweep decides
        cutoff = self.clock() - self.grace_seconds
        for content_hash in candidates if self.store is not None else ():
            self.store.remove_local(content_hash, cutoff)
            if self.adapter_blobs is None:
                continue
            try:
                self._delete_if_old(self.adapter_blobs, adapter_blob_key(content_hash))
            except StoreUnavailable:
                failed += 1
        return failed

    def _old(self, modified: float) -> bool:
        return self.clock() - modified >= self.grace_seconds

    def _delete_if_old(self, blobs: Blobs, key: str) -> bool:
        """Delete unless it was made or touched since it was listed; True if deleted."""
        modified = blobs.modified_at(key)
        if modified is None or not self._old(modified):
            return False
        blobs.delete(key)
        return True

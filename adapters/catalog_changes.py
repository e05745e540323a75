"""What changed in the catalog since a version: the rows the change log names, as they are now.

Every catalog write notes the adapters, tenants and keys it touched in `catalog_log`
(adapters/database.py). A gateway that has applied version `since` reads the entries after it
and then the current rows they name; a row that no longer exists comes back as None, a deletion.
Applying a row twice is harmless, so a write that commits while this reads is taken now or on
the next look. When the log no longer reaches back to `since`, or a write touched more than the
log names (`EVERYTHING`), or so much changed that the whole catalog is cheaper to read, there are
no changes to give: the caller loads a snapshot (`Database.snapshot`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlalchemy as sa

from adapters.database import (
    ADAPTER,
    EVERYTHING,
    KEY,
    TENANT,
    AdapterRow,
    Database,
    KeyRow,
    _adapter_row,
    adapters_table,
    changes_table,
    keys_table,
    log_table,
    tenants_table,
)

# More entries than this since the last look: a snapshot is read instead.
MAX_ENTRIES = 2000
_CHUNK = 400  # keys per IN (...) list


@dataclass(frozen=True)
class Changes:
    """Rows touched after a version, as of `version`; None marks a row that is gone."""

    version: int
    adapters: dict[tuple[str, str], AdapterRow | None] = field(default_factory=dict)
    tenants: dict[str, tuple[dict, float] | None] = field(default_factory=dict)
    keys: dict[str, KeyRow | None] = field(default_factory=dict)  # by key_id

    def __len__(self) -> int:
        return len(self.adapters) + len(self.tenants) + len(self.keys)


def read_changes(catalog: Database, since: int, max_entries: int = MAX_ENTRIES) -> Changes | None:
    """The rows changed after version `since`; None when only a snapshot can say (see the module)."""
    with catalog._guard(), catalog.raw_engine.connect() as conn, conn.begin():
        version, floor = conn.execute(sa.select(changes_table.c.version, changes_table.c.log_floor)).one()
        if since < floor or since > version:
            return None  # pruned past it, or a catalog replaced under this process
        if version == since:
            return Changes(version)
        entries = conn.execute(
            sa.select(log_table.c.kind, log_table.c.base_fingerprint, log_table.c.owner, log_table.c.name)
            .where(log_table.c.version > since)
            .distinct()
            .limit(max_entries + 1)
        ).all()
        if len(entries) > max_entries or any(kind == EVERYTHING for kind, *_ in entries):
            return None
        mine = catalog.base.fingerprint
        adapter_keys = {(owner, name) for kind, base, owner, name in entries if kind == ADAPTER and base == mine}
        tenant_names = {owner for kind, _, owner, _ in entries if kind == TENANT}
        key_ids = {name for kind, _, _, name in entries if kind == KEY}
        changes = Changes(version)
        changes.adapters.update(dict.fromkeys(sorted(adapter_keys)))
        for chunk in _chunks(sorted(adapter_keys)):
            pairs = sa.tuple_(adapters_table.c.owner, adapters_table.c.name).in_(chunk)
            for r in conn.execute(sa.select(adapters_table).where(adapters_table.c.base_fingerprint == mine, pairs)):
                changes.adapters[(r.owner, r.name)] = _adapter_row(r)
        changes.tenants.update(dict.fromkeys(sorted(tenant_names)))
        for chunk in _chunks(sorted(tenant_names)):
            for r in conn.execute(sa.select(tenants_table).where(tenants_table.c.name.in_(chunk))):
                changes.tenants[r.name] = (json.loads(r.limits), r.created_at)
        changes.keys.update(dict.fromkeys(sorted(key_ids)))
        for chunk in _chunks(sorted(key_ids)):
            for r in conn.execute(catalog._keys_query().where(keys_table.c.key_id.in_(chunk))):
                changes.keys[r.key_id] = KeyRow(r.key_id, r.tenant, r.key_hash, r.created_at)
    return changes


def _chunks(items: list, size: int = _CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]

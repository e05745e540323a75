"""The gateway's database, its catalog: adapters, tenants and API key hashes, and every SQL statement.

The standard library's sqlite3 is enough: writes are rare (registrations, keys) and small, and
WAL mode lets the gateway read while it writes. Every write is one transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    rank INTEGER NOT NULL,
    target_modules TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, name)
);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    limits TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    key_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class AdapterRow:
    owner: str
    name: str
    content_hash: str
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    pinned: bool
    created_at: float


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    tenant: str
    key_hash: str
    created_at: float


class Database:
    """The catalog in one SQLite file; safe to call from the event loop (each call is a short transaction)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _write(self, sql: str, params: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, params).rowcount

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- adapters -----------------------------------------------------------------------------

    def put_adapter(self, row: AdapterRow) -> None:
        self._write(
            "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(owner, name) DO UPDATE SET "
            "content_hash=excluded.content_hash, rank=excluded.rank, target_modules=excluded.target_modules, "
            "size_bytes=excluded.size_bytes, pinned=excluded.pinned, created_at=excluded.created_at",
            (
                row.owner,
                row.name,
                row.content_hash,
                row.rank,
                json.dumps(row.target_modules),
                row.size_bytes,
                int(row.pinned),
                row.created_at,
            ),
        )

    def delete_adapter(self, owner: str, name: str) -> None:
        self._write("DELETE FROM adapters WHERE owner = ? AND name = ?", (owner, name))

    def set_pinned(self, owner: str, name: str, pinned: bool) -> None:
        self._write("UPDATE adapters SET pinned = ? WHERE owner = ? AND name = ?", (int(pinned), owner, name))

    def adapters(self) -> list[AdapterRow]:
        rows = self._read("SELECT * FROM adapters ORDER BY owner, name")
        return [
            AdapterRow(owner, name, digest, rank, tuple(json.loads(targets)), size, bool(pinned), created)
            for owner, name, digest, rank, targets, size, pinned, created in rows
        ]

    # -- tenants and keys ---------------------------------------------------------------------

    def add_tenant(self, name: str, limits: dict) -> bool:
        try:
            self._write("INSERT INTO tenants VALUES (?, ?, ?)", (name, json.dumps(limits), time.time()))
        except sqlite3.IntegrityError:
            return False
        return True

    def set_tenant_limits(self, name: str, limits: dict) -> None:
        self._write("UPDATE tenants SET limits = ? WHERE name = ?", (json.dumps(limits), name))

    def delete_tenant(self, name: str) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM adapters WHERE owner = ?", (name,))
                self._db.execute("DELETE FROM tenants WHERE name = ?", (name,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def tenants(self) -> dict[str, tuple[dict, float]]:
        return {name: (json.loads(limits), created) for name, limits, created in self._read("SELECT * FROM tenants")}

    def add_key(self, row: KeyRow) -> None:
        self._write("INSERT INTO api_keys VALUES (?, ?, ?, ?)", (row.key_id, row.tenant, row.key_hash, row.created_at))

    def delete_key(self, tenant: str, key_id: str) -> bool:
        return self._write("DELETE FROM api_keys WHERE tenant = ? AND key_id = ?", (tenant, key_id)) > 0

    def keys(self) -> list[KeyRow]:
        return [KeyRow(*row) for row in self._read("SELECT key_id, tenant, key_hash, created_at FROM api_keys")]

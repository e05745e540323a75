"""The gateway's database, its catalog: adapters, tenants and API key hashes, and every SQL statement.

The tables are declared once, in SQLAlchemy Core, and the same statements run on SQLite (the
embedded default, one file under --state-dir) and on PostgreSQL (several gateways on one
catalog). Alembic creates and migrates the schema at start (`adapters/migrations/`).

Every write is one transaction that also bumps `catalog_changes.version` and notes in
`catalog_log` which rows it touched; other processes poll that counter (and on PostgreSQL are
woken by NOTIFY) and then reload those rows (adapters/catalog_changes.py). Adapters are
scoped by the base model they were registered on: this process sees only its own base's rows.

Methods block; the server calls them from a worker thread. A database that cannot be reached
raises CatalogUnavailable, and SQLAlchemy's pool reconnects on a later call by itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

from adapters.errors import CatalogUnavailable, OwnerNotFound, QuotaExceeded
from adapters.spec import SHARED

logger = logging.getLogger(__name__)

NOTIFY_CHANNEL = "lora_gateway_catalog"
CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT_MS = 5000

metadata = sa.MetaData()

# Runs inside a write's transaction before it; refuses the write by raising (adapters/fine_tuning_db.py).
WriteGuard = Callable[[sa.Connection], None]

adapters_table = sa.Table(
    "adapters",
    metadata,
    sa.Column("base_fingerprint", sa.Text, nullable=False, server_default=""),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("base_model", sa.Text, nullable=False, server_default=""),
    sa.Column("content_hash", sa.Text, nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("target_modules", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("pinned", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.PrimaryKeyConstraint("base_fingerprint", "owner", "name", name="adapters_base_pkey"),
)

tenants_table = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("limits", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

keys_table = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("tenant", sa.Text, sa.ForeignKey("tenants.name", ondelete="CASCADE"), nullable=False),
    sa.Column("key_hash", sa.Text, nullable=False, unique=True),
    sa.Column("created_at", sa.Double, nullable=False),
)

changes_table = sa.Table(
    "catalog_changes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    # The change log is complete for the versions after this one; older entries are pruned.
    sa.Column("log_floor", sa.BigInteger, nullable=False, server_default="0"),
)

# One entry per row a write touched (its kind and key), at the version the write bumped to.
log_table = sa.Table(
    "catalog_log",
    metadata,
    sa.Column("version", sa.BigInteger, nullable=False, index=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("base_fingerprint", sa.Text, nullable=False, server_default=""),
    sa.Column("owner", sa.Text, nullable=False, server_default=""),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
)
ADAPTER, TENANT, KEY, EVERYTHING = "adapter", "tenant", "key", "all"


@dataclass(frozen=True)
class BaseIdentity:
    """The base model adapters are registered on: its served name and a fingerprint of its files."""

    served_name: str = ""
    fingerprint: str = ""  # "" also marks rows written before bases were recorded


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


@dataclass(frozen=True)
class Snapshot:
    """Everything this process serves from, read in one transaction."""

    version: int
    adapters: list[AdapterRow]
    tenants: dict[str, tuple[dict, float]]
    keys: list[KeyRow]


def engine_url(url: str | Path) -> sa.URL:
    """A SQLAlchemy URL for `sqlite:///PATH`, `postgresql://...` or a plain path (SQLite)."""
    if isinstance(url, Path) or "://" not in str(url):
        return sa.URL.create("sqlite", database=str(url))
    try:
        parsed = sa.make_url(str(url))
    except sa.exc.ArgumentError:
        raise ValueError("--catalog-url: use sqlite:///PATH or postgresql://user:pass@host:port/db") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError("--catalog-url: use sqlite:///PATH or postgresql://user:pass@host:port/db")
    return parsed


def safe_url(url: str | Path) -> str:
    """The URL with its password hidden, for logs and messages."""
    try:
        return engine_url(url).render_as_string(hide_password=True)
    except (ValueError, sa.exc.ArgumentError):
        return "(unparsable URL)"


class Database:
    """The catalog on SQLite or PostgreSQL, scoped to one base model's adapters."""

    # The change log keeps this many versions; a gateway further behind reloads everything.
    log_keep_versions = 10_000
    log_prune_every = 100

    def __init__(self, url: str | Path, base: BaseIdentity | None = None, on_error: Callable[[], None] | None = None):
        self.base = base or BaseIdentity()
        self.on_error = on_error
        # The newest change this process wrote: an older snapshot would undo it in memory.
        self.written_version = 0
        self._versions_lock = threading.Lock()
        self._listener = None
        self._closed = threading.Event()  # ends a wait_for_change that would outlast the catalog
        self.url = engine_url(url)
        self.dialect = self.url.get_backend_name()
        if self.dialect == "sqlite":
            Path(self.url.database or "").parent.mkdir(parents=True, exist_ok=True)
            self._engine = sa.create_engine(self.url, connect_args={"check_same_thread": False})
            event.listen(self._engine, "connect", _sqlite_pragmas)
        else:
            self._engine = sa.create_engine(
                self.url,
                pool_pre_ping=True,  # a connection dropped by a restart is replaced, not reused
                pool_size=4,
                max_overflow=4,
                pool_timeout=CONNECT_TIMEOUT_SECONDS,
                connect_args={
                    "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                    "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                },
            )
        with self._guard():
            self._migrate()
            if self.base.fingerprint:
                self._claim_unrecorded()

    def close(self) -> None:
        self._closed.set()
        self._drop_listener()
        self._engine.dispose()

    @property
    def raw_engine(self) -> sa.Engine:
        return self._engine

    # -- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.IntegrityError:
            raise
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            # The driver's text can hold the host; log the kind only.
            logger.warning("catalog database unreachable (%s)", type(getattr(exc, "orig", exc)).__name__)
            if self.on_error is not None:
                self.on_error()
            raise CatalogUnavailable("the catalog database is unreachable; try again shortly") from None

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """One transaction that also tells other processes that something changed.

        The counter is bumped first. On SQLite that takes the write lock before anything is read,
        so a write that checks a row first (`hold_owner`) never fails on a stale snapshot; on
        PostgreSQL the counter's row lock puts these transactions one after another, so a tenant's
        deletion and a registration for it never hold each other's rows.
        """
        with self._guard(), self._engine.begin() as conn:
            bump = changes_table.update().values(version=changes_table.c.version + 1)
            version = conn.execute(bump.returning(changes_table.c.version)).scalar_one()
            conn.info["catalog_version"], conn.info["catalog_logged"] = version, False
            yield conn
            if not conn.info.pop("catalog_logged"):
                self.log(conn, EVERYTHING)  # a write that did not say what it touched: reload it all
            if version % self.log_prune_every == 0:
                self._prune_log(conn, version - self.log_keep_versions)
            if self.dialect == "postgresql":
                conn.execute(sa.text(f"NOTIFY {NOTIFY_CHANNEL}"))
        with self._versions_lock:
            self.written_version = max(self.written_version, version)

    def log(self, conn: sa.Connection, kind: str, owner: str = "", name: str = "", *, mine: bool = False) -> None:
        """Inside a write: note that it touched this row (an adapter of this base with `mine`)."""
        base = self.base.fingerprint if mine else ""
        entry = {"base_fingerprint": base, "owner": owner, "name": name}
        conn.execute(log_table.insert().values(version=conn.info["catalog_version"], kind=kind, **entry))
        conn.info["catalog_logged"] = True

    def log_owner(self, conn: sa.Connection, owner: str) -> None:
        """Inside a write: note every adapter (of every base) and key `owner` has, and the tenant itself."""
        version = sa.literal(conn.info["catalog_version"], sa.BigInteger)
        columns = ["version", "kind", "base_fingerprint", "owner", "name"]
        adapters = sa.select(
            version,
            sa.literal(ADAPTER),
            adapters_table.c.base_fingerprint,
            adapters_table.c.owner,
            adapters_table.c.name,
        ).where(adapters_table.c.owner == owner)
        keys = sa.select(version, sa.literal(KEY), sa.literal(""), keys_table.c.tenant, keys_table.c.key_id).where(
            keys_table.c.tenant == owner
        )
        conn.execute(log_table.insert().from_select(columns, adapters))
        conn.execute(log_table.insert().from_select(columns, keys))
        self.log(conn, TENANT, owner)

    def _prune_log(self, conn: sa.Connection, floor: int) -> None:
        if floor <= 0:
            return
        conn.execute(log_table.delete().where(log_table.c.version <= floor))
        conn.execute(changes_table.update().where(changes_table.c.log_floor < floor).values(log_floor=floor))

    def _read(self, statement) -> list[sa.Row]:
        with self._guard(), self._engine.connect() as conn:
            return list(conn.execute(statement))

    def _migrate(self) -> None:
        from adapters.migrations import upgrade

        with self._engine.begin() as conn:
            if self.dialect == "postgresql":
                # Several gateways may start at once; one migrates, the others wait for it.
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7125338)"))
            upgrade(conn)

    def _claim_unrecorded(self) -> None:
        """Adapters written before bases were recorded belong to the first base that opens them."""
        mine = sa.select(adapters_table.c.owner, adapters_table.c.name).where(
            adapters_table.c.base_fingerprint == self.base.fingerprint
        )
        statement = (
            adapters_table.update()
            .where(adapters_table.c.base_fingerprint == "")
            .where(sa.tuple_(adapters_table.c.owner, adapters_table.c.name).not_in(mine))
            .values(base_fingerprint=self.base.fingerprint, base_model=self.base.served_name)
        )
        with self._write() as conn:
            claimed = conn.execute(statement).rowcount
            if claimed:
                self.log(conn, EVERYTHING)
            conn.info["catalog_logged"] = True  # nothing changed otherwise
        if claimed:
            logger.info("%d adapters from before base models were recorded now belong to this base", claimed)

    def _mine(self):
        return adapters_table.c.base_fingerprint == self.base.fingerprint

    # -- changes -------------------------------------------------------------------------------

    def version(self) -> int:
        return self._read(sa.select(changes_table.c.version))[0][0]

    def wait_for_change(self, timeout: float) -> bool:
        """Block up to `timeout` s; True when PostgreSQL said the catalog changed.

        On SQLite, and while PostgreSQL is unreachable, it only waits: the caller polls the
        change counter after each wait, so a lost notification costs one poll interval. Closing
        the catalog ends that wait, so that no thread outlives it by up to --catalog-poll-seconds.
        """
        if self.dialect != "postgresql":
            self._closed.wait(timeout)
            return False
        try:
            if self._listener is None:
                self._listener = self._engine.raw_connection()
                self._listener.driver_connection.autocommit = True
                self._listener.driver_connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
            for _ in self._listener.driver_connection.notifies(timeout=timeout, stop_after=1):
                return True
            return False
        except Exception:  # noqa: BLE001 - any failure of the listening connection: poll, reconnect later
            self._drop_listener()
            self._closed.wait(timeout)
            return False

    def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.invalidate()
            except Exception:  # noqa: BLE001 - it is being thrown away
                pass

    def snapshot(self) -> Snapshot:
        with self._guard(), self._engine.connect() as conn, conn.begin():
            version = conn.execute(sa.select(changes_table.c.version)).scalar_one()
            adapters = [_adapter_row(r) for r in conn.execute(self._adapters_query())]
            tenants = {r.name: (json.loads(r.limits), r.created_at) for r in conn.execute(sa.select(tenants_table))}
            keys = [_key_row(r) for r in conn.execute(self._keys_query())]
        return Snapshot(version, adapters, tenants, keys)

    # -- adapters ------------------------------------------------------------------------------

    def _adapters_query(self):
        return sa.select(adapters_table).where(self._mine()).order_by(adapters_table.c.owner, adapters_table.c.name)

    def adapters(self) -> list[AdapterRow]:
        return [_adapter_row(r) for r in self._read(self._adapters_query())]

    def put_adapter(self, row: AdapterRow, guard: WriteGuard | None = None, max_adapters: int | None = None) -> None:
        """Add or replace; an upsert, so two gateways registering one name at once both succeed.

        The owner must still exist (OwnerNotFound when its tenant was deleted meanwhile), and
        `guard` runs first in the same transaction: it refuses the write by raising. With
        `max_adapters`, a new name is refused (QuotaExceeded) when the owner has that many already;
        the count and the write are one transaction, behind the change counter's lock, so gateways
        sharing the catalog cannot together pass the limit.
        """
        values = {
            "content_hash": row.content_hash,
            "rank": row.rank,
            "target_modules": json.dumps(row.target_modules),
            "size_bytes": row.size_bytes,
            "pinned": row.pinned,
            "created_at": row.created_at,
            "base_model": self.base.served_name,
        }
        key = {"base_fingerprint": self.base.fingerprint, "owner": row.owner, "name": row.name}
        insert = _dialect_insert(self.dialect)(adapters_table).values(**key, **values)
        upsert = insert.on_conflict_do_update(index_elements=list(key), set_=values)
        with self._write() as conn:
            self.hold_owner(conn, row.owner)
            if guard is not None:
                guard(conn)
            if max_adapters is not None:
                others = self._count_adapters(conn, row.owner, but=row.name)
                if others >= max_adapters:
                    raise QuotaExceeded(
                        f"this tenant already has its limit of {max_adapters} adapters; delete one first",
                        limit="max_adapters",
                    )
            conn.execute(upsert)
            self.log(conn, ADAPTER, row.owner, row.name, mine=True)

    def _count_adapters(self, conn: sa.Connection, owner: str | None, *, but: str, pinned: bool = False) -> int:
        """This base's adapters of `owner`, leaving out its `but`; with None, every tenant's (`but` unused)."""
        statement = sa.select(sa.func.count()).select_from(adapters_table).where(self._mine())
        if owner is None:
            statement = statement.where(adapters_table.c.owner != SHARED)
        else:
            statement = statement.where(adapters_table.c.owner == owner, adapters_table.c.name != but)
        if pinned:
            statement = statement.where(adapters_table.c.pinned == sa.true())
        return int(conn.execute(statement).scalar_one())

    def delete_adapter(self, owner: str, name: str) -> None:
        with self._write() as conn:
            conn.execute(
                adapters_table.delete().where(
                    self._mine(), adapters_table.c.owner == owner, adapters_table.c.name == name
                )
            )
            self.log(conn, ADAPTER, owner, name, mine=True)

    def set_pinned(
        self, owner: str, name: str, pinned: bool, *, max_pinned: int | None = None, max_tenant_pins: int | None = None
    ) -> None:
        """Pin or unpin. A pin may be refused (QuotaExceeded): past the owner's `max_pinned`, or past
        `max_tenant_pins`, the pins of every tenant's adapters together; counted in the write's transaction."""
        with self._write() as conn:
            if pinned and max_pinned is not None:
                if self._count_adapters(conn, owner, but=name, pinned=True) >= max_pinned:
                    raise QuotaExceeded(
                        f"this tenant already pins its limit of {max_pinned} adapters; unpin one first",
                        limit="max_pinned",
                    )
            if pinned and max_tenant_pins is not None:
                tenant_pins = self._count_adapters(conn, None, but=name, pinned=True)
                this = sa.select(adapters_table.c.pinned).where(
                    self._mine(), adapters_table.c.owner == owner, adapters_table.c.name == name
                )
                already = bool(conn.execute(this).scalar())
                if not already and tenant_pins >= max_tenant_pins:
                    raise QuotaExceeded(
                        f"tenants' pins together hold {tenant_pins} of the engine's cache, the most they may "
                        f"(half of --max-cpu-loras); unpin one first",
                        limit="max_pinned",
                    )
            conn.execute(
                adapters_table.update()
                .where(self._mine(), adapters_table.c.owner == owner, adapters_table.c.name == name)
                .values(pinned=pinned)
            )
            self.log(conn, ADAPTER, owner, name, mine=True)

    def content_hashes(self) -> set[str]:
        """The content of every adapter, of every base: what a store may never delete."""
        return {r.content_hash for r in self._read(sa.select(adapters_table.c.content_hash).distinct())}

    # -- tenants and keys ----------------------------------------------------------------------

    def add_tenant(
        self, name: str, limits: dict, first_key: KeyRow | None = None, created_at: float | None = None
    ) -> bool:
        """A new tenant, with its first key in the same transaction; False when the name is taken.

        `created_at` tells this tenant from an earlier one of the same name (catalog_sync compares it).
        """
        created_at = time.time() if created_at is None else created_at
        try:
            with self._write() as conn:
                conn.execute(tenants_table.insert().values(name=name, limits=json.dumps(limits), created_at=created_at))
                self.log(conn, TENANT, name)
                if first_key is not None:
                    conn.execute(keys_table.insert().values(**_key_values(first_key)))
                    self.log(conn, KEY, name, first_key.key_id)
        except sa.exc.IntegrityError:
            return False
        return True

    def set_tenant_limits(self, name: str, limits: dict) -> None:
        with self._write() as conn:
            conn.execute(tenants_table.update().where(tenants_table.c.name == name).values(limits=json.dumps(limits)))
            self.log(conn, TENANT, name)

    def hold_owner(self, conn: sa.Connection, owner: str) -> None:
        """Inside a write: OwnerNotFound unless `owner` is shared or a tenant, which then stays until commit.

        A tenant's deletion (adapters/retention.py) deletes its row first. On PostgreSQL this
        locks the row (FOR KEY SHARE), so one of the two transactions waits for the other; on
        SQLite the write lock orders them. Either way no row is left behind for a deleted owner.
        """
        if owner == SHARED:
            return
        held = sa.select(tenants_table.c.name).where(tenants_table.c.name == owner)
        if conn.execute(held.with_for_update(read=True, key_share=True)).first() is None:
            raise OwnerNotFound(owner)

    def lock_owner(self, conn: sa.Connection, owner: str) -> None:
        """Inside a write that checks a quota before it inserts: one such write per owner at a time.

        On PostgreSQL it locks the tenant's row (FOR NO KEY UPDATE, which leaves `hold_owner`'s
        readers alone), so a second gateway's check waits for the first one's insert and counts
        it. SQLite needs nothing here: there the caller's insert comes first and takes the
        database's write lock, and it counts after it.
        """
        if self.dialect != "postgresql" or owner == SHARED:
            return
        row = sa.select(tenants_table.c.name).where(tenants_table.c.name == owner)
        if conn.execute(row.with_for_update(key_share=True)).first() is None:
            raise OwnerNotFound(owner)

    def tenants(self) -> dict[str, tuple[dict, float]]:
        return {r.name: (json.loads(r.limits), r.created_at) for r in self._read(sa.select(tenants_table))}

    def add_key(self, row: KeyRow) -> None:
        with self._write() as conn:
            conn.execute(keys_table.insert().values(**_key_values(row)))
            self.log(conn, KEY, row.tenant, row.key_id)

    def delete_key(self, tenant: str, key_id: str) -> bool:
        with self._write() as conn:
            self.log(conn, KEY, tenant, key_id)
            statement = keys_table.delete().where(keys_table.c.tenant == tenant, keys_table.c.key_id == key_id)
            return conn.execute(statement).rowcount > 0

    def _keys_query(self):
        return sa.select(keys_table.c.key_id, keys_table.c.tenant, keys_table.c.key_hash, keys_table.c.created_at)

    def keys(self) -> list[KeyRow]:
        return [_key_row(r) for r in self._read(self._keys_query())]


def _dialect_insert(dialect: str):
    """INSERT with ON CONFLICT, which both dialects spell alike."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


class CatalogTables:
    """Records kept in the catalog's database beside its adapters (files, jobs, batches).

    Their writes skip the catalog's change counter: no other gateway reloads its adapters for them.
    """

    def __init__(self, catalog: Database):
        self.catalog = catalog
        self.base_fingerprint = catalog.base.fingerprint

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self.catalog._guard(), self.catalog.raw_engine.begin() as conn:
            yield conn

    def _read(self, statement) -> list[sa.Row]:
        return self.catalog._read(statement)


def _adapter_row(r: sa.Row) -> AdapterRow:
    return AdapterRow(
        r.owner,
        r.name,
        r.content_hash,
        r.rank,
        tuple(json.loads(r.target_modules)),
        r.size_bytes,
        bool(r.pinned),
        r.created_at,
    )


def _key_values(row: KeyRow) -> dict:
    return {"key_id": row.key_id, "tenant": row.tenant, "key_hash": row.key_hash, "created_at": row.created_at}


def _key_row(r: sa.Row) -> KeyRow:
    return KeyRow(r.key_id, r.tenant, r.key_hash, r.created_at)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")  # another process may hold the write lock briefly
    cursor.close()

"""adapters/database.py on SQLite and on a real PostgreSQL: schema, scoping by base, changes, faults."""

from __future__ import annotations

import logging
import sqlite3

import pytest

from adapters.database import AdapterRow, BaseIdentity, Database, KeyRow, safe_url
from adapters.errors import CatalogUnavailable
from adapters.migrations import current_revision
from adapters.retention import purge_tenant

BASE_A = BaseIdentity("base-a", "a" * 64)
BASE_B = BaseIdentity("base-b", "b" * 64)

# The schema of the release before migrations, as it wrote its SQLite file.
LEGACY_SCHEMA = """
CREATE TABLE adapters (owner TEXT NOT NULL, name TEXT NOT NULL, content_hash TEXT NOT NULL,
    rank INTEGER NOT NULL, target_modules TEXT NOT NULL, size_bytes INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, PRIMARY KEY (owner, name));
CREATE TABLE tenants (name TEXT PRIMARY KEY, limits TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE api_keys (key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    key_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
"""


def row(name: str, content_hash: str = "h1", owner: str = "", pinned: bool = False) -> AdapterRow:
    return AdapterRow(owner, name, content_hash, 8, ("q_proj", "v_proj"), 1234, pinned, 1700000000.25)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    return request.getfixturevalue("postgres_url")


def test_a_catalog_from_before_migrations_opens_with_its_rows(tmp_path):
    path = tmp_path / "catalog.sqlite3"
    legacy = sqlite3.connect(path)
    legacy.executescript(LEGACY_SCHEMA)
    legacy.execute("INSERT INTO adapters VALUES ('', 'poet', 'h1', 8, '[\"q_proj\"]', 99, 1, 1.5)")
    legacy.execute("INSERT INTO tenants VALUES ('acme', '{\"max_adapters\": 3}', 2.5)")
    legacy.execute("INSERT INTO api_keys VALUES ('key_1', 'acme', 'hash1', 3.5)")
    legacy.commit()
    legacy.close()

    catalog = Database(path, BASE_A)
    assert catalog.adapters() == [AdapterRow("", "poet", "h1", 8, ("q_proj",), 99, True, 1.5)]
    assert catalog.tenants() == {"acme": ({"max_adapters": 3}, 2.5)}
    assert catalog.keys() == [KeyRow("key_1", "acme", "hash1", 3.5)]
    with catalog.raw_engine.connect() as conn:
        assert current_revision(conn) == "0009"
    catalog.close()
    # The first base claimed the old rows; another base does not see them.
    assert Database(path, BASE_B).adapters() == []
    assert Database(path, BASE_A).adapters()[0].name == "poet"


def test_rows_round_trip_and_each_write_bumps_the_version(url):
    catalog = Database(url, BASE_A)
    start = catalog.version()
    catalog.put_adapter(row("poet"))
    catalog.put_adapter(row("poet", "h2"))  # a replacement updates in place
    catalog.set_pinned("", "poet", True)
    assert catalog.adapters() == [row("poet", "h2", pinned=True)]
    assert catalog.version() == start + 3 == catalog.written_version
    assert catalog.add_tenant("acme", {"max_adapters": 2}, KeyRow("key_1", "acme", "hash1", 5.0))
    assert not catalog.add_tenant("acme", {})
    catalog.put_adapter(row("mine", owner="acme"))
    snapshot = catalog.snapshot()
    assert snapshot.version == catalog.version()
    assert [r.name for r in snapshot.adapters] == ["poet", "mine"] or [r.name for r in snapshot.adapters] == [
        "mine",
        "poet",
    ]
    assert snapshot.tenants == {"acme": ({"max_adapters": 2}, pytest.approx(snapshot.tenants["acme"][1]))}
    assert snapshot.keys == [KeyRow("key_1", "acme", "hash1", 5.0)]
    purge_tenant(catalog, "acme")  # its keys and adapters go with it
    assert catalog.keys() == [] and [r.name for r in catalog.adapters()] == ["poet"]
    assert not catalog.delete_key("acme", "key_1")
    catalog.close()


def test_adapters_are_scoped_by_base_and_names_unique_per_base(url):
    a, b = Database(url, BASE_A), Database(url, BASE_B)
    a.put_adapter(row("poet", "h-a"))
    b.put_adapter(row("poet", "h-b"))
    assert [r.content_hash for r in a.adapters()] == ["h-a"]
    assert [r.content_hash for r in b.adapters()] == ["h-b"]
    b.delete_adapter("", "poet")
    assert [r.content_hash for r in a.adapters()] == ["h-a"] and b.adapters() == []
    assert a.content_hashes() == {"h-a"}
    a.add_tenant("shared-tenant", {})
    assert "shared-tenant" in b.tenants()  # tenants and keys are shared across bases
    a.close()
    b.close()


def test_two_processes_opening_one_new_postgres_catalog_at_once_both_succeed(postgres_url):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        catalogs = list(pool.map(lambda _: Database(postgres_url, BASE_A), range(4)))
    catalogs[0].put_adapter(row("poet"))
    assert all(c.adapters() == [row("poet")] for c in catalogs)


def test_postgres_notifies_other_processes_of_a_change(postgres_url):
    writer, reader = Database(postgres_url, BASE_A), Database(postgres_url, BASE_A)
    assert reader.wait_for_change(0.2) is False  # listening now, nothing changed
    writer.put_adapter(row("poet"))
    assert reader.wait_for_change(5.0) is True


def test_closing_a_sqlite_catalog_ends_a_wait_for_change_at_once(tmp_path):
    import threading

    catalog = Database(tmp_path / "catalog.sqlite3", BASE_A)
    waiter = threading.Thread(target=catalog.wait_for_change, args=(60,))
    waiter.start()
    catalog.close()
    waiter.join(5)
    assert not waiter.is_alive(), "the wait outlived its catalog"


def test_an_unreachable_postgres_raises_catalog_unavailable_and_reconnects(postgres_server, caplog):
    postgres_server.start()
    url = postgres_server.new_database()
    password_url = url.replace("lgw@", "lgw:hunter2@")
    errors = []
    catalog = Database(password_url, BASE_A, on_error=lambda: errors.append(1))
    catalog.put_adapter(row("poet"))
    postgres_server.stop()
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(CatalogUnavailable) as refused:
            catalog.put_adapter(row("sonnet"))
        assert "hunter2" not in refused.value.message and "127.0.0.1" not in refused.value.message
        assert "hunter2" not in caplog.text
        with pytest.raises(CatalogUnavailable):
            catalog.version()
        assert len(errors) == 2
        assert catalog.wait_for_change(0.1) is False
    finally:
        postgres_server.start()
    catalog.put_adapter(row("sonnet"))  # the same object, no restart: the pool reconnected
    assert [r.name for r in catalog.adapters()] == ["poet", "sonnet"]


def test_urls_are_checked_and_shown_without_passwords(tmp_path):
    with pytest.raises(ValueError, match="--catalog-url"):
        Database("mysql://u:p@h/db")
    with pytest.raises(ValueError, match="--catalog-url"):
        Database("://no-scheme")
    assert "secret" not in safe_url("postgresql://lgw:secret@db:5432/gw")
    assert safe_url("postgresql://lgw:secret@db:5432/gw").startswith("postgresql+psycopg://lgw:***@db:5432/gw")
    assert Database(tmp_path / "plain.sqlite3").adapters() == []


def test_many_processes_registering_one_name_at_once_all_succeed(url):
    from concurrent.futures import ThreadPoolExecutor

    catalogs = [Database(url, BASE_A) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda pair: pair[1].put_adapter(row("poet", f"h{pair[0]}")), enumerate(catalogs)))
    assert len(catalogs[0].adapters()) == 1 and catalogs[0].adapters()[0].content_hash in {"h0", "h1", "h2", "h3"}

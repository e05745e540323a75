"""The catalog sync applies only what changed (adapters/catalog_changes.py), on SQLite and a real
PostgreSQL: another catalog writer's inserts, updates and deletions of adapters, tenants and keys
reach this process's registry, tenants and key ring without a snapshot, and a process that fell
behind what the change log keeps takes a snapshot instead. Plus registrations at once against a
tenant's quota over HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from adapters.catalog_changes import read_changes
from adapters.database import AdapterRow, BaseIdentity, Database, KeyRow
from adapters.registry import Registry
from adapters.retention import purge_tenant
from adapters.spec import SHARED
from adapters.store import AdapterStore
from server.http.auth import KeyRing
from server.http.tenancy import TenantLimits, Tenants
from server.ops.catalog_sync import CatalogSync
from tests.adapter_files import make_adapter
from tests.conftest import full_gateway
from tests.fakes import FakeEngine

BASE = BaseIdentity("base", "f" * 64)
OTHER_BASE = BaseIdentity("other", "e" * 64)
HASHES = ["1" * 64, "2" * 64]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    return request.getfixturevalue("postgres_url")


class Follower:
    """What a gateway holds of the catalog, kept current by its CatalogSync."""

    def __init__(self, url: str, root: Path):
        self.catalog = Database(url, BASE)
        self.store = store = AdapterStore(root / "store")
        self.registry = Registry(
            FakeEngine(), base_name="base", base_adapter=None, max_resident=4, catalog=self.catalog, store=store
        )
        self.tenants = Tenants(self.catalog, TenantLimits())
        self.keyring = KeyRing(self.catalog, None, None)
        self.gone: list[str] = []

        async def on_gone(name: str) -> None:
            self.gone.append(name)

        self.sync = CatalogSync(self.catalog, self.registry, self.tenants, self.keyring, 0.1, on_tenant_gone=on_gone)

    async def start(self) -> None:
        await self.registry.start()  # which removes store folders no row names: made after it
        for content_hash in HASHES:
            self.store.path_for(content_hash).mkdir(parents=True, exist_ok=True)

    def adapters(self) -> dict[tuple[str, str], tuple[str, bool]]:
        return {e.key: (e.spec.content_hash, e.pinned) for e in self.registry.entries()}

    def keys(self) -> set[str]:
        return {row.key_id for row in self.keyring._by_hash.values()}


def adapter(owner: str, name: str, content_hash: str = HASHES[0], pinned: bool = False) -> AdapterRow:
    return AdapterRow(owner, name, content_hash, 8, ("q_proj",), 100, pinned, time.time())


def key(key_id: str, tenant: str) -> KeyRow:
    return KeyRow(key_id, tenant, "hash-" + key_id, time.time())


async def test_another_writers_changes_apply_one_row_at_a_time(url, tmp_path):
    writer, other_base = Database(url, BASE), Database(url, OTHER_BASE)
    follower = Follower(url, tmp_path)
    await follower.start()
    assert await follower.sync.check()  # the first look loads a snapshot
    assert follower.sync.snapshots == 1

    # Inserts: a tenant with its first key, its adapter, a shared one; another base's is not ours.
    assert writer.add_tenant("acme", {"max_adapters": 5}, key("key_1", "acme"), created_at=10.0)
    writer.put_adapter(adapter("acme", "mine"))
    writer.put_adapter(adapter(SHARED, "common"))
    other_base.put_adapter(adapter(SHARED, "elsewhere"))
    changes = read_changes(follower.catalog, follower.sync.seen_version)
    assert set(changes.adapters) == {("acme", "mine"), ("", "common")}
    assert await follower.sync.check()
    assert follower.adapters() == {("acme", "mine"): (HASHES[0], False), ("", "common"): (HASHES[0], False)}
    assert follower.tenants.limits("acme").max_adapters == 5
    assert follower.keys() == {"key_1"}

    # Updates: new content, a pin, new limits, a second key.
    writer.put_adapter(adapter("acme", "mine", HASHES[1]))
    writer.set_pinned(SHARED, "common", True)
    writer.set_tenant_limits("acme", {"max_adapters": 2})
    writer.add_key(key("key_2", "acme"))
    assert await follower.sync.check()
    assert follower.adapters() == {("acme", "mine"): (HASHES[1], False), ("", "common"): (HASHES[0], True)}
    assert follower.tenants.limits("acme").max_adapters == 2
    assert follower.keys() == {"key_1", "key_2"}
    assert not await follower.sync.check()  # nothing new

    # Deletions: a key, an adapter, then the tenant with what it still owns.
    assert writer.delete_key("acme", "key_1")
    writer.delete_adapter(SHARED, "common")
    assert await follower.sync.check()
    assert follower.adapters() == {("acme", "mine"): (HASHES[1], False)}
    assert follower.keys() == {"key_2"}
    purge_tenant(writer, "acme")
    assert await follower.sync.check()
    assert follower.adapters() == {}
    assert follower.keys() == set()
    assert follower.gone == ["acme"]

    # Deleted and made again: the earlier tenant is gone for this process too.
    assert writer.add_tenant("beta", {}, created_at=20.0)
    assert await follower.sync.check()
    purge_tenant(writer, "beta")
    assert writer.add_tenant("beta", {}, created_at=30.0)
    assert await follower.sync.check()
    assert follower.gone == ["acme", "beta"]
    assert follower.tenants.created_at("beta") == 30.0

    assert follower.sync.snapshots == 1  # every change above came through the change log
    for database in (writer, other_base, follower.catalog):
        database.close()


async def test_a_follower_behind_what_the_log_keeps_takes_a_snapshot(url, tmp_path):
    writer = Database(url, BASE)
    writer.log_keep_versions, writer.log_prune_every = 3, 1
    follower = Follower(url, tmp_path)
    assert writer.add_tenant("acme", {}, key("key_1", "acme"))
    writer.put_adapter(adapter("acme", "old"))
    await follower.start()
    assert await follower.sync.check()
    assert follower.sync.snapshots == 1 and follower.keys() == {"key_1"}

    # More changes than the log keeps: a deletion among them must still apply.
    writer.delete_adapter("acme", "old")
    assert writer.delete_key("acme", "key_1")
    for index in range(5):
        writer.put_adapter(adapter(SHARED, f"new-{index}"))
    assert read_changes(follower.catalog, follower.sync.seen_version) is None
    assert await follower.sync.check()
    assert follower.sync.snapshots == 2
    assert set(follower.adapters()) == {(SHARED, f"new-{index}") for index in range(5)}
    assert follower.keys() == set()

    # In step again, it goes on one change at a time.
    writer.put_adapter(adapter(SHARED, "later"))
    assert await follower.sync.check()
    assert follower.sync.snapshots == 2 and (SHARED, "later") in follower.adapters()

    # A bulk change (more rows than a step reads) is a snapshot too.
    assert read_changes(follower.catalog, follower.sync.seen_version - 2, max_entries=1) is None
    writer.close()
    follower.catalog.close()


async def test_registrations_at_once_against_a_quota_register_exactly_the_quota(tmp_path):
    limit, attempts = 7, 200
    folders = [make_adapter(tmp_path / f"a{i}", seed=i) for i in range(attempts)]
    async with full_gateway(tmp_path / "state", tenant_max_concurrent=attempts) as gw:
        created = await gw.client.post(
            "/v1/tenants", json={"name": "acme", "limits": {"max_adapters": limit}}, headers=gw.admin
        )
        assert created.status_code == 201, created.text
        headers = gw.as_(created.json()["api_key"])

        async def register(index: int) -> int:
            files = [("file", (p.name, p.read_bytes())) for p in sorted(folders[index].iterdir())]
            response = await gw.client.post("/v1/adapters", data={"name": f"a{index}"}, files=files, headers=headers)
            assert response.status_code in (201, 429), response.text
            return response.status_code

        statuses = await asyncio.gather(*(register(i) for i in range(attempts)))
        assert statuses.count(201) == limit
        assert gw.registry.count("acme") == limit
        assert len([row for row in gw.registry.catalog.adapters() if row.owner == "acme"]) == limit

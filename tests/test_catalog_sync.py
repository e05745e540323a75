"""Several gateways on one catalog and one store: changes through one are in force on the others.

Each gateway here is the whole app over a FakeEngine, on its own state dir (its own local cache),
sharing a real catalog (a SQLite file, or a real PostgreSQL) and a real store (a shared folder,
or S3 through moto's server).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from tests.adapter_files import make_adapter
from tests.conftest import full_gateway

IN_FORCE_SECONDS = 2.0


def files_of(folder: Path):
    return [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]


async def eventually(check, within: float = IN_FORCE_SECONDS) -> float:
    """Seconds until `check()` (async) is true; fails the test past `within`."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"not in force within {within} s")
        await asyncio.sleep(0.05)


@pytest.fixture(params=["sqlite+folder", "postgresql+s3"])
def shared_urls(request, tmp_path):
    if request.param == "sqlite+folder":
        (tmp_path / "shared" / "store").mkdir(parents=True)  # a mounted volume: the gateway never creates it
        return f"sqlite:///{tmp_path / 'shared' / 'catalog.sqlite3'}", f"file://{tmp_path / 'shared' / 'store'}"
    return request.getfixturevalue("postgres_url"), request.getfixturevalue("s3_env").url


@asynccontextmanager
async def gateways(tmp_path: Path, urls: tuple[str, str], count: int = 2):
    catalog_url, store_url = urls
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                full_gateway(tmp_path / f"gw{i}", catalog_url=catalog_url, store_url=store_url, max_cpu_loras=4)
            )
            for i in range(count)
        ]


async def upload(gw, name, folder, headers=None):
    return await gw.client.post(
        "/v1/adapters", data={"name": name}, files=files_of(folder), headers=headers or gw.admin
    )


async def complete(gw, model, headers=None):
    return await gw.client.post(
        "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}, headers=headers or gw.admin
    )


async def test_adapter_changes_through_either_gateway_reach_the_other(tmp_path, shared_urls):
    first = make_adapter(tmp_path / "v1", rank=8)
    second = make_adapter(tmp_path / "v2", rank=8, seed=7)
    async with gateways(tmp_path, shared_urls) as (a, b):
        created = await upload(a, "support", first)
        assert created.status_code == 201, created.text

        async def b_serves_it():
            return (await complete(b, "support")).status_code == 200

        await eventually(b_serves_it)
        b_card = (await b.client.get("/v1/adapters/support", headers=b.admin)).json()
        assert b_card["content_hash"] == created.json()["content_hash"]
        entry = b.registry.find("", "support")
        assert entry.spec.path.is_relative_to(tmp_path / "gw1")  # b's own cache, filled from the store
        assert entry.adapter_id in b.engine.added

        replaced = await upload(b, "support", second)
        assert replaced.status_code == 201, replaced.text

        async def a_has_the_new_version():
            card = (await a.client.get("/v1/adapters/support", headers=a.admin)).json()
            return card["content_hash"] == replaced.json()["content_hash"]

        await eventually(a_has_the_new_version)
        assert (await complete(a, "support")).status_code == 200

        assert (await a.client.post("/v1/adapters/support/pin", headers=a.admin)).status_code == 200

        async def b_sees_the_pin():
            return (await b.client.get("/v1/adapters/support", headers=b.admin)).json()["pinned"] is True

        await eventually(b_sees_the_pin)

        assert (await b.client.delete("/v1/adapters/support", headers=b.admin)).status_code == 200

        async def a_forgot_it():
            return (await complete(a, "support")).status_code == 404

        await eventually(a_forgot_it)


async def test_tenants_limits_and_keys_through_either_gateway_reach_the_other(tmp_path, shared_urls):
    async with gateways(tmp_path, shared_urls) as (a, b):
        created = await a.client.post("/v1/tenants", json={"name": "acme"}, headers=a.admin)
        assert created.status_code == 201, created.text
        key = created.json()["api_key"]

        async def key_works_on_b():
            return (await b.client.get("/v1/models", headers=b.as_(key))).status_code == 200

        await eventually(key_works_on_b)

        patched = await b.client.patch("/v1/tenants/acme", json={"limits": {"max_adapters": 1}}, headers=b.admin)
        assert patched.status_code == 200, patched.text

        async def a_has_the_limit():
            return a.app.state.tenants.limits("acme").max_adapters == 1

        await eventually(a_has_the_limit)

        # The adapter count is global: one registered through a fills the quota on b too.
        assert (await upload(a, "mine", make_adapter(tmp_path / "mine"), b.as_(key))).status_code == 201

        async def b_counts_it():
            return b.registry.count("acme") == 1

        await eventually(b_counts_it)
        refused = await upload(b, "more", make_adapter(tmp_path / "more", seed=3), b.as_(key))
        assert refused.status_code == 429, refused.text

        second = await b.client.post("/v1/tenants/acme/keys", headers=b.admin)
        second_key, second_id = second.json()["api_key"], second.json()["id"]

        async def second_key_works_on_a():
            return (await a.client.get("/v1/models", headers=a.as_(second_key))).status_code == 200

        await eventually(second_key_works_on_a)
        assert (await a.client.delete(f"/v1/tenants/acme/keys/{second_id}", headers=a.admin)).status_code == 200

        async def revoked_on_b():
            return (await b.client.get("/v1/models", headers=b.as_(second_key))).status_code == 401

        await eventually(revoked_on_b)

        assert (await b.client.delete("/v1/tenants/acme", headers=b.admin)).status_code == 200

        async def tenant_gone_on_a():
            gone = (await a.client.get("/v1/models", headers=a.as_(key))).status_code == 401
            return gone and a.registry.count("acme") == 0

        await eventually(tenant_gone_on_a)


async def test_both_gateways_restart_into_the_same_state_and_a_third_starts_into_it(tmp_path, shared_urls):
    """The third has a state dir of its own: it serves the tenant's key and fetches the adapter's
    files from the store (tests/engine/test_shared_state.py checks the same fetch on the engine)."""
    async with gateways(tmp_path, shared_urls) as (a, _b):
        assert (await upload(a, "support", make_adapter(tmp_path / "v1"))).status_code == 201
        key = (await a.client.post("/v1/tenants", json={"name": "acme"}, headers=a.admin)).json()["api_key"]
    assert not (tmp_path / "gw2").exists()
    async with gateways(tmp_path, shared_urls, count=3) as (a, b, c):
        for gw in (a, b, c):
            assert (await complete(gw, "support", gw.as_(key))).status_code == 200
        served = c.engine.generated[-1][-1]
        assert served is not None and served.name.startswith("support@"), served
        fetched = Path(served.path)
        assert fetched.is_relative_to(tmp_path / "gw2")
        assert {f.name: f.read_bytes() for f in fetched.iterdir() if f.is_file()} == {
            f.name: f.read_bytes() for f in (tmp_path / "v1").iterdir()
        }


async def test_with_the_database_down_known_adapters_and_keys_serve_and_writes_get_503(
    tmp_path, postgres_server, s3_env
):
    urls = (postgres_server.new_database(), s3_env.url)
    async with gateways(tmp_path, urls, count=1) as (gw,):
        assert (await upload(gw, "support", make_adapter(tmp_path / "v1"))).status_code == 201
        key = (await gw.client.post("/v1/tenants", json={"name": "acme"}, headers=gw.admin)).json()["api_key"]
        postgres_server.stop()
        try:
            assert (await complete(gw, "support", gw.as_(key))).status_code == 200
            assert (await gw.client.get("/ready")).status_code == 200
            for write in (
                gw.client.post("/v1/tenants", json={"name": "other"}, headers=gw.admin),
                gw.client.post("/v1/tenants/acme/keys", headers=gw.admin),
                gw.client.post("/v1/adapters/support/pin", headers=gw.admin),
                gw.client.delete("/v1/adapters/support", headers=gw.admin),
                upload(gw, "new-one", make_adapter(tmp_path / "new", seed=5)),
            ):
                response = await write
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "catalog_unavailable"
                assert int(response.headers["retry-after"]) >= 1
                assert "127.0.0.1" not in response.text
            # Nothing was half-done: the adapter still serves, unpinned, and nothing new exists.
            assert (await complete(gw, "support", gw.as_(key))).status_code == 200
            assert gw.registry.find("", "support").pinned is False and gw.registry.find("", "new-one") is None
            metrics = (await gw.client.get("/metrics", headers=gw.admin)).text
            assert 'lora_gateway_backend_errors_total{backend="catalog"}' in metrics
            assert 'lora_gateway_backend_errors_total{backend="catalog"} 0.0' not in metrics
        finally:
            postgres_server.start()

        async def writes_work_again():
            response = await gw.client.post("/v1/tenants", json={"name": "other"}, headers=gw.admin)
            return response.status_code == 201

        await eventually(writes_work_again, within=10)


async def test_with_the_store_down_cached_adapters_serve_and_a_cold_one_gets_503(
    tmp_path, postgres_server, s3_env, moto_server
):
    urls = (postgres_server.new_database(), s3_env.url)
    async with gateways(tmp_path, urls) as (a, b):
        assert (await upload(a, "support", make_adapter(tmp_path / "v1"))).status_code == 201

        async def b_knows_it():
            return b.registry.find("", "support") is not None

        await eventually(b_knows_it)
        moto_server.stop()
        try:
            assert (await complete(a, "support")).status_code == 200  # in a's cache
            cold = await complete(b, "support")  # b must fetch it
            assert cold.status_code == 503, cold.text
            assert cold.json()["error"]["code"] == "store_unavailable"
            assert moto_server.endpoint_url not in cold.text
            assert (await b.client.get("/ready")).status_code == 200
            scrape = await b.client.get("/metrics", headers=b.admin)
            assert scrape.status_code == 200
            assert 'lora_gateway_backend_errors_total{backend="store"} 0.0' not in scrape.text
        finally:
            moto_server.start()
        # moto keeps objects in memory, so the restarted store lost the files: still a 503, never a 500.
        assert (await complete(b, "support")).status_code == 503

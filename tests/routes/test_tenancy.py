from __future__ import annotations

import asyncio
import logging

import pytest

from tests.adapter_files import make_adapter
from tests.conftest import ADMIN_KEY, full_gateway


def files_of(folder):
    return [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]


async def new_tenant(gw, name, **limits):
    response = await gw.client.post("/v1/tenants", json={"name": name, "limits": limits}, headers=gw.admin)
    assert response.status_code == 201, response.text
    return response.json()["api_key"]


async def upload(gw, key, name, folder):
    return await gw.client.post("/v1/adapters", data={"name": name}, files=files_of(folder), headers=gw.as_(key))


@pytest.fixture
async def world(tmp_path):
    """Tenants a and b; shared 's'; a's 'support' and 'only-a'; b's 'support'."""
    async with full_gateway(tmp_path / "state") as gw:
        keys = {"a": await new_tenant(gw, "a"), "b": await new_tenant(gw, "b")}
        shared = make_adapter(tmp_path / "s", seed=1)
        assert (
            await gw.client.post("/v1/adapters", json={"name": "s", "path": str(shared)}, headers=gw.admin)
        ).status_code == 201
        assert (await upload(gw, keys["a"], "support", make_adapter(tmp_path / "sa", seed=2))).status_code == 201
        assert (await upload(gw, keys["a"], "only-a", make_adapter(tmp_path / "oa", seed=3))).status_code == 201
        assert (await upload(gw, keys["b"], "support", make_adapter(tmp_path / "sb", seed=4))).status_code == 201
        gw.keys = keys
        yield gw


VISIBLE = {"a": {"base", "s", "support", "only-a"}, "b": {"base", "s", "support"}}
NAMES = ["base", "s", "support", "only-a", "ghost"]


async def call(gw, key, endpoint, model):
    headers = gw.as_(key)
    if endpoint == "completions":
        return await gw.client.post(
            "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}, headers=headers
        )
    if endpoint == "chat":
        return await gw.client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
            headers=headers,
        )
    return await gw.client.get(f"/v1/{endpoint}/{model}", headers=headers)


@pytest.mark.parametrize("endpoint", ["completions", "chat", "models", "adapters"])
async def test_every_tenant_sees_exactly_what_it_owns_and_shared(world, endpoint):
    for tenant, key in world.keys.items():
        for model in NAMES:
            response = await call(world, key, endpoint, model)
            allowed = model in VISIBLE[tenant] and not (endpoint == "adapters" and model == "base")
            if allowed:
                assert response.status_code == 200, (tenant, endpoint, model, response.text)
                continue
            # another tenant's adapter answers exactly like one that does not exist
            ghost = (await call(world, key, endpoint, "ghost-" + model)).json()
            assert response.status_code == 404, (tenant, endpoint, model)
            assert response.json() == _renamed(ghost, "ghost-" + model, model), (tenant, endpoint, model)


def _renamed(body, old, new):
    error = dict(body["error"])
    error["message"] = error["message"].replace(old, new)
    return {"error": error}


async def test_the_same_name_runs_each_tenants_own_adapter(world):
    ids = {}
    for tenant, key in world.keys.items():
        await call(world, key, "completions", "support")
        ids[tenant] = world.engine.generated[-1][3].adapter_id
    assert ids["a"] == world.registry.find("a", "support").adapter_id
    assert ids["b"] == world.registry.find("b", "support").adapter_id
    assert ids["a"] != ids["b"]


async def test_lists_show_only_what_ownership_allows(world):
    for tenant, key in world.keys.items():
        models = {m["id"] for m in (await world.client.get("/v1/models", headers=world.as_(key))).json()["data"]}
        assert models == VISIBLE[tenant]
        adapters = {a["name"] for a in (await world.client.get("/v1/adapters", headers=world.as_(key))).json()["data"]}
        assert adapters == VISIBLE[tenant] - {"base"}
    everything = {m["id"] for m in (await world.client.get("/v1/models", headers=world.admin)).json()["data"]}
    assert everything == {"base", "s", "a/support", "a/only-a", "b/support"}
    admin_call = await world.client.post(
        "/v1/completions", json={"model": "b/support", "prompt": "x", "max_tokens": 1}, headers=world.admin
    )
    assert admin_call.status_code == 200


async def test_tenants_cannot_touch_what_is_not_theirs(world, tmp_path):
    a = world.as_(world.keys["a"])
    path = await world.client.post(
        "/v1/adapters", json={"name": "p", "path": str(make_adapter(tmp_path / "p"))}, headers=a
    )
    assert path.status_code == 403 and path.json()["error"]["code"] == "admin_only"
    assert (await world.client.delete("/v1/adapters/s", headers=a)).status_code == 403
    assert (await world.client.delete("/v1/adapters/ghost", headers=a)).status_code == 404
    b_only = await world.client.post("/v1/adapters/only-a/pin", headers=world.as_(world.keys["b"]))
    assert b_only.status_code == 404
    for route in ["/v1/tenants", "/v1/tenants/a"]:
        assert (await world.client.get(route, headers=a)).status_code == 403
    assert (await world.client.post("/v1/tenants/b/keys", headers=a)).status_code == 403
    as_other = await world.client.post(
        "/v1/adapters", data={"name": "x", "owner": "b"}, files=files_of(make_adapter(tmp_path / "x")), headers=a
    )
    assert as_other.status_code == 403
    assert (await world.client.delete("/v1/adapters/support", headers=a)).status_code == 200
    assert world.registry.find("b", "support") is not None


async def test_keys_are_required_and_revocation_is_immediate(world):
    assert (await world.client.get("/v1/models")).status_code == 401
    wrong = await world.client.get("/v1/models", headers=world.as_("lgw-nope"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert wrong.headers["www-authenticate"] == "Bearer"
    for open_route in ["/health", "/ready"]:
        assert (await world.client.get(open_route)).status_code == 200
    second = (await world.client.post("/v1/tenants/a/keys", headers=world.admin)).json()
    first_id = (await world.client.get("/v1/tenants/a", headers=world.admin)).json()["keys"][0]["id"]
    assert (await world.client.delete(f"/v1/tenants/a/keys/{first_id}", headers=world.admin)).status_code == 200
    assert (await world.client.get("/v1/models", headers=world.as_(world.keys["a"]))).status_code == 401
    assert (await world.client.get("/v1/models", headers=world.as_(second["api_key"]))).status_code == 200
    listing = (await world.client.get("/v1/tenants", headers=world.admin)).text
    assert second["api_key"] not in listing and world.keys["b"] not in listing


async def test_rate_limit_trips_and_recovers(world):
    await world.client.patch("/v1/tenants/a", json={"limits": {"requests_per_second": 2}}, headers=world.admin)
    key = world.keys["a"]
    results = [(await call(world, key, "completions", "s")) for _ in range(3)]
    assert [r.status_code for r in results] == [200, 200, 429]
    assert results[2].json()["error"]["type"] == "rate_limit_error" and int(results[2].headers["retry-after"]) >= 1
    assert (await call(world, world.keys["b"], "completions", "s")).status_code == 200  # b is not affected
    await asyncio.sleep(0.6)
    assert (await call(world, key, "completions", "s")).status_code == 200


async def test_concurrency_limit_trips_and_recovers(world):
    await world.client.patch("/v1/tenants/a", json={"limits": {"max_concurrent": 1}}, headers=world.admin)
    world.engine.release = asyncio.Event()
    first = asyncio.create_task(call(world, world.keys["a"], "completions", "s"))
    await asyncio.sleep(0.05)
    second = await call(world, world.keys["a"], "completions", "s")
    assert second.status_code == 429 and "at once" in second.json()["error"]["message"]
    world.engine.release.set()
    assert (await first).status_code == 200
    assert (await call(world, world.keys["a"], "completions", "s")).status_code == 200


async def test_adapter_count_and_upload_size_limits(world, tmp_path):
    await world.client.patch(
        "/v1/tenants/b", json={"limits": {"max_adapters": 1, "max_upload_bytes": 50_000}}, headers=world.admin
    )
    over = await upload(world, world.keys["b"], "second", make_adapter(tmp_path / "two"))
    assert over.status_code == 429
    replacing = await upload(world, world.keys["b"], "support", make_adapter(tmp_path / "again", seed=9))
    assert replacing.status_code == 201  # replacing one does not count as another
    await world.client.patch("/v1/tenants/b", json={"limits": {"max_adapters": 5}}, headers=world.admin)
    big = await upload(world, world.keys["b"], "big", make_adapter(tmp_path / "big", rank=64))
    assert big.status_code == 413


async def test_tenants_and_keys_survive_a_restart(tmp_path):
    async with full_gateway(tmp_path / "state") as first:
        key = await new_tenant(first, "t", max_concurrent=3)
        await upload(first, key, "mine", make_adapter(tmp_path / "m"))
    async with full_gateway(tmp_path / "state") as second:
        assert (await call(second, key, "completions", "mine")).status_code == 200
        tenant = (await second.client.get("/v1/tenants/t", headers=second.admin)).json()
        assert tenant["limits"]["max_concurrent"] == 3 and tenant["adapters"] == 1


async def test_keys_never_reach_the_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    async with full_gateway(tmp_path / "state") as gw:
        key = await new_tenant(gw, "quiet")
        await call(gw, key, "completions", "base")
        await gw.client.get("/v1/models", headers=gw.as_("lgw-wrong-key-value"))
    logged = caplog.text
    assert "quiet" in logged  # the tenant was logged, so the check below looks at real output
    for secret in [key, ADMIN_KEY, "lgw-wrong-key-value"]:
        assert secret not in logged


async def test_a_tenant_another_gateway_just_made_can_be_changed_and_deleted_here(tmp_path):
    """Before this gateway's sync has seen it, the catalog still decides that the tenant exists."""
    async with full_gateway(tmp_path / "state", catalog_poll_seconds=60) as gw:
        gw.registry.catalog.add_tenant("elsewhere", {})  # as another gateway of the catalog would
        assert not gw.app.state.tenants.exists("elsewhere")
        patched = await gw.client.patch("/v1/tenants/elsewhere", json={"limits": {"max_adapters": 3}}, headers=gw.admin)
        assert patched.status_code == 200 and patched.json()["limits"]["max_adapters"] == 3
        assert (await gw.client.delete("/v1/tenants/elsewhere", headers=gw.admin)).status_code == 200
        assert (await gw.client.patch("/v1/tenants/nobody", json={"limits": {}}, headers=gw.admin)).status_code == 404

"""GET /v1/usage: a tenant sees its own requests only, the admin everyone's; the window's arithmetic."""

from __future__ import annotations

import pytest

from server.ops.usage import ModelKey, UsageWindow, percentile
from tests.adapter_files import make_adapter
from tests.conftest import full_gateway
from tests.routes.test_tenancy import new_tenant, upload


async def complete(gw, key, model, max_tokens=2):
    response = await gw.client.post(
        "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": max_tokens}, headers=gw.as_(key)
    )
    return response.status_code


def by_model(report) -> dict[str, dict]:
    return {entry["model"]: entry for entry in report["data"]}


@pytest.fixture
async def traffic(tmp_path):
    """Tenants a and b, each with an adapter 'support'; a calls it twice and the base once, b its own once."""
    async with full_gateway(tmp_path / "state") as gw:
        keys = {"a": await new_tenant(gw, "a"), "b": await new_tenant(gw, "b")}
        for tenant, seed in (("a", 1), ("b", 2)):
            folder = make_adapter(tmp_path / tenant, seed=seed)
            assert (await upload(gw, keys[tenant], "support", folder)).status_code == 201
        assert await complete(gw, keys["a"], "support") == 200
        assert await complete(gw, keys["a"], "support", max_tokens=3) == 200
        assert await complete(gw, keys["a"], "base") == 200
        assert await complete(gw, keys["b"], "support") == 200
        gw.keys = keys
        yield gw


async def usage(gw, key, **params):
    response = await gw.client.get("/v1/usage", params=params, headers=gw.as_(key))
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_tenant_sees_only_its_own_requests(traffic):
    seen_by_a = by_model(await usage(traffic, traffic.keys["a"]))
    assert set(seen_by_a) == {"base", "support"}
    assert seen_by_a["support"]["requests"] == 2
    assert seen_by_a["base"]["requests"] == 1  # a's own call, not b's
    assert seen_by_a["base"]["base"] is True
    seen_by_b = by_model(await usage(traffic, traffic.keys["b"]))
    assert set(seen_by_b) == {"support"}
    assert seen_by_b["support"]["requests"] == 1


async def test_the_admin_sees_every_tenant_by_qualified_name(traffic):
    report = await usage(traffic, traffic.admin["Authorization"].removeprefix("Bearer "))
    seen = by_model(report)
    assert set(seen) == {"base", "a/support", "b/support"}
    a_support = seen["a/support"]
    assert a_support["requests"] == 2 and a_support["errors"] == 0
    assert a_support["completion_tokens"] > 0 and a_support["prompt_tokens"] > 0
    assert a_support["p50_latency_ms"] is not None and a_support["p99_latency_ms"] >= a_support["p50_latency_ms"]
    assert sum(point["requests"] for point in a_support["series"]) == 2
    assert len(a_support["series"]) == report["window_seconds"] // report["bucket_seconds"]


async def test_usage_needs_a_valid_key_and_ignores_unknown_models(traffic):
    assert (await traffic.client.get("/v1/usage")).status_code == 401
    assert (await traffic.client.get("/v1/usage", headers=traffic.as_("lgw-not-a-key"))).status_code == 401
    # Made-up names (404) and other tenants' adapters are not recorded for anyone.
    assert await complete(traffic, traffic.keys["b"], "ghost") == 404
    admin = traffic.admin["Authorization"].removeprefix("Bearer ")
    assert set(by_model(await usage(traffic, admin))) == {"base", "a/support", "b/support"}
    assert (await traffic.client.get("/v1/usage", params={"minutes": 0}, headers=traffic.admin)).status_code == 400


async def test_minutes_narrows_the_window(traffic):
    report = await usage(traffic, traffic.keys["a"], minutes=1)
    assert report["window_seconds"] == 60
    assert len(by_model(report)["support"]["series"]) == 60 // report["bucket_seconds"]


def test_old_buckets_leave_the_window():
    now = [1000.0]
    window = UsageWindow(window_seconds=60, bucket_seconds=10, clock=lambda: now[0])
    model = ModelKey("", "pirate")
    window.record(None, model, ok=True, seconds=0.5, prompt_tokens=3, completion_tokens=4)
    window.record(None, model, ok=False, seconds=0.1, prompt_tokens=3, completion_tokens=0)
    report = window.report(lambda caller, key: True, qualified=True)
    (entry,) = report["data"]
    assert (entry["requests"], entry["errors"], entry["p50_latency_ms"]) == (2, 1, 500.0)
    assert entry["requests_per_second"] == round(2 / 60, 4)
    now[0] += 61
    assert window.report(lambda caller, key: True, qualified=True)["data"] == []


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None

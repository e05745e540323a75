"""GET /metrics names every tenant's adapters (`adapter="bob/secret-project"`): with keys set it
takes the admin key or --metrics-key, and nobody else sees those names."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.adapter_files import make_adapter
from tests.conftest import ADMIN_KEY, FullGateway, full_gateway
from tests.routes.test_tenancy import new_tenant, upload
from tests.security.test_open_mode import assert_openai_error

METRICS_KEY = "metrics-key-for-prometheus-0123456789"
SECRET = "secret-project"


@asynccontextmanager
async def bobs_gateway(tmp_path) -> AsyncIterator[tuple[FullGateway, str, str]]:
    """A keyed gateway where tenant bob has run his adapter 'secret-project' once; eve is another tenant."""
    async with full_gateway(tmp_path / "state", metrics_key=METRICS_KEY) as gw:
        bob = await new_tenant(gw, "bob")
        eve = await new_tenant(gw, "eve")
        assert (await upload(gw, bob, SECRET, make_adapter(tmp_path / "secret"))).status_code == 201
        body = {"model": SECRET, "prompt": "hi", "max_tokens": 2}
        assert (await gw.client.post("/v1/completions", json=body, headers=gw.as_(bob))).status_code == 200
        yield gw, bob, eve


async def test_metrics_take_the_admin_or_metrics_key_only(tmp_path):
    async with bobs_gateway(tmp_path) as (gw, bob, eve):
        for headers, status, code in [
            ({}, 401, "invalid_api_key"),
            (gw.as_("not-a-key-at-all-but-long-enough-0123"), 401, "invalid_api_key"),
            ({"Authorization": f"Basic {METRICS_KEY}"}, 401, "invalid_api_key"),
            (gw.as_(eve), 403, "admin_only"),
            (gw.as_(bob), 403, "admin_only"),  # even the owner: the series name everyone's adapters
        ]:
            refused = await gw.client.get("/metrics", headers=headers)
            assert_openai_error(refused, status, code)
            assert SECRET not in refused.text
        for key in (METRICS_KEY, ADMIN_KEY):
            scrape = await gw.client.get("/metrics", headers=gw.as_(key))
            assert scrape.status_code == 200, scrape.text
            assert scrape.headers["content-type"].startswith("text/plain")
            assert f'adapter="{SECRET}"' in scrape.text  # as bob named it


async def test_the_metrics_key_opens_nothing_else(tmp_path):
    async with bobs_gateway(tmp_path) as (gw, _, _):
        as_prometheus = gw.as_(METRICS_KEY)
        assert (await gw.client.get("/metrics", headers=as_prometheus)).status_code == 200
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", "/v1/adapters"),
            ("GET", "/v1/usage"),
            ("GET", "/v1/tenants"),
            ("GET", "/v1/cluster"),
        ]:
            response = await gw.client.request(method, path, headers=as_prometheus)
            assert_openai_error(response, 401, "invalid_api_key")
            assert SECRET not in response.text
        generate = await gw.client.post("/generate", json={"inputs": "hi"}, headers=as_prometheus)
        assert generate.status_code == 401


async def test_the_metrics_key_is_never_logged_or_shown(tmp_path, caplog):
    from server.config import Settings

    settings = Settings(admin_key=ADMIN_KEY, metrics_key=METRICS_KEY)
    assert METRICS_KEY not in repr(settings) and METRICS_KEY not in str(settings)
    assert METRICS_KEY not in settings.model_dump_json()
    with caplog.at_level(logging.DEBUG):
        async with bobs_gateway(tmp_path) as (gw, _, _):
            await gw.client.get("/metrics", headers=gw.as_(METRICS_KEY))
            await gw.client.get("/v1/models", headers=gw.as_(METRICS_KEY))
    logged = caplog.text + repr([vars(record) for record in caplog.records])
    assert "GET /metrics 200" in logged and "GET /v1/models 401" in logged  # the capture saw them
    assert METRICS_KEY not in logged

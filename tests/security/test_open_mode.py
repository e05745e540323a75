"""Open mode (no --admin-key) answers this machine only: a web page cannot reach it through DNS
rebinding (a foreign Host) or a cross-site request (a foreign Origin), nor post a form to TGI's routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from adapters.database import Database
from adapters.registry import Registry
from adapters.spec import SHARED
from server.app import build_app
from server.config import Settings
from tests.fakes import FakeEngine, fake_spec

COMPLETION = {"model": "alpha", "prompt": "hi", "max_tokens": 2}
GENERATE = {"inputs": "hi", "parameters": {"adapter_id": "alpha", "max_new_tokens": 2}}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and isinstance(error["code"], str)


def assert_tgi_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str)
    return body


@asynccontextmanager
async def open_gateway(
    tmp_path, host: str = "127.0.0.1", **settings
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine]]:
    """An open gateway (no admin key) listening on `host`, serving 'base' and the adapter 'alpha'."""
    config = Settings(served_model_name="base", state_dir=tmp_path, host=host, **settings)
    engine = FakeEngine()
    catalog = Database(tmp_path / "catalog.sqlite3")
    registry = Registry(engine, base_name="base", base_adapter=None, max_resident=2, catalog=catalog)
    app = build_app(config, engine, registry)
    async with app.router.lifespan_context(app):
        await registry.register(SHARED, "alpha", fake_spec("alpha"), load=True)
        # No Host of its own: each request below names one, as a browser would.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://unused") as client:
            yield client, engine
    registry.catalog.close()


async def test_a_rebound_name_is_refused_and_local_names_are_served(tmp_path):
    async with open_gateway(tmp_path) as (client, engine):
        for host in (
            "attacker.example",
            "attacker.example:8000",
            "127.0.0.1.nip.io:8000",
            "localhost.attacker.example",
        ):
            refused = await client.post("/v1/completions", json=COMPLETION, headers={"Host": host})
            assert_openai_error(refused, 403, "host_not_allowed")
            assert "--admin-key" in refused.json()["error"]["message"]
            assert_openai_error(await client.get("/v1/models", headers={"Host": host}), 403, "host_not_allowed")
        assert engine.generated == []  # refused before any work
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "127.0.0.2", "[::1]:8000", "LOCALHOST:8000"):
            served = await client.post("/v1/completions", json=COMPLETION, headers={"Host": host})
            assert served.status_code == 200, (host, served.text)
        assert len(engine.generated) == 6


async def test_every_route_is_guarded_probes_metrics_and_console_included(tmp_path):
    async with open_gateway(tmp_path) as (client, _):
        for path in ("/health", "/ready", "/metrics", "/v1/usage", "/ui/", "/v1/tenants"):
            response = await client.get(path, headers={"Host": "attacker.example"})
            assert_openai_error(response, 403, "host_not_allowed")
        # The same paths from a local name are served.
        assert (await client.get("/metrics", headers={"Host": "127.0.0.1:8000"})).status_code == 200


async def test_tgi_routes_refuse_a_foreign_host_in_tgi_shape(tmp_path):
    async with open_gateway(tmp_path) as (client, engine):
        for method, path in (("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"), ("GET", "/info")):
            kwargs = {"json": GENERATE} if method == "POST" else {}
            response = await client.request(method, path, headers={"Host": "attacker.example"}, **kwargs)
            assert assert_tgi_error(response, 403)["error_type"] == "permission"
        assert engine.generated == []
        local = await client.post("/generate", json=GENERATE, headers={"Host": "localhost:8000"})
        assert local.status_code == 200, local.text


async def test_a_cross_site_request_is_refused(tmp_path):
    async with open_gateway(tmp_path) as (client, engine):
        local = {"Host": "127.0.0.1:8000"}
        for origin in ("https://attacker.example", "http://attacker.example:8000", "null", "http://localhost:8000"):
            response = await client.post("/v1/completions", json=COMPLETION, headers=local | {"Origin": origin})
            assert_openai_error(response, 403, "cross_site_request")
            tgi = await client.post("/generate", json=GENERATE, headers=local | {"Origin": origin})
            assert_tgi_error(tgi, 403)
        # The tenants' keys and the admin's actions are what a page would go for.
        tenant = await client.post(
            "/v1/tenants", json={"name": "evil"}, headers=local | {"Origin": "https://attacker.example"}
        )
        assert_openai_error(tenant, 403, "cross_site_request")
        assert engine.generated == []
        # The console's own requests are same-origin: served.
        same = await client.post(
            "/v1/completions", json=COMPLETION, headers=local | {"Origin": "http://127.0.0.1:8000"}
        )
        assert same.status_code == 200, same.text


async def test_the_listen_address_is_a_local_name(tmp_path):
    async with open_gateway(tmp_path, host="192.0.2.10", allow_open=True) as (client, _):
        assert (await client.get("/v1/models", headers={"Host": "192.0.2.10:8000"})).status_code == 200
        assert_openai_error(await client.get("/v1/models", headers={"Host": "192.0.2.11"}), 403, "host_not_allowed")
        assert_openai_error(await client.get("/v1/models", headers={"Host": "gw.example"}), 403, "host_not_allowed")


async def test_on_every_interface_any_address_but_no_name_is_local(tmp_path):
    # --allow-open --host 0.0.0.0: the machine's addresses are all listen addresses; names can be rebound.
    async with open_gateway(tmp_path, host="0.0.0.0", allow_open=True) as (client, _):
        assert (await client.get("/v1/models", headers={"Host": "198.51.100.7:8000"})).status_code == 200
        assert_openai_error(
            await client.get("/v1/models", headers={"Host": "attacker.example"}), 403, "host_not_allowed"
        )


async def test_tgi_routes_take_json_only(gateway):
    """A cross-site form posts urlencoded, multipart or text/plain: TGI's routes refuse them all."""
    for path in ("/generate", "/generate_stream", "/"):
        for content_type in (
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            None,
        ):
            headers = {"Content-Type": content_type} if content_type else {}
            response = await gateway.client.post(path, content=b'{"inputs": "hi"}', headers=headers)
            body = assert_tgi_error(response, 415)
            assert body["error_type"] == "validation" and "application/json" in body["error"]
    assert gateway.engine.generated == []
    for content_type in ("application/json", "application/json; charset=utf-8"):
        response = await gateway.client.post(
            "/generate", content=b'{"inputs": "hi"}', headers={"Content-Type": content_type}
        )
        assert response.status_code == 200, response.text

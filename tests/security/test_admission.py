"""Admit, then work: a request over its tenant's rate or concurrency is refused before anything is
tokenized, composed, converted or stored; a missing model counts like any other; a prompt is
bounded in characters before it is tokenized, and tokenized off the event loop."""

from __future__ import annotations

import re

import pytest

from tests.adapter_files import make_adapter
from tests.routes.test_tenancy import files_of
from tests.security.hostile import BODIES, ROUTES, hostile_world, staging_left, stored_adapters

TINY_RATE = {"requests_per_second": 0.01}  # a burst of one, then one every 100 s


@pytest.mark.parametrize("route", ROUTES)
async def test_a_rate_limited_request_is_not_tokenized(tmp_path, route):
    async with hostile_world(tmp_path, limits=TINY_RATE) as gw:
        body = BODIES[route]()
        assert (await gw.client.post(ROUTES[route], json=body, headers=gw.tenant)).status_code == 200
        tokenized = len(gw.engine.tokenized)
        limited = await gw.client.post(ROUTES[route], json=body, headers=gw.tenant)
        assert limited.status_code == 429, limited.text
        assert len(gw.engine.tokenized) == tokenized


@pytest.mark.parametrize("route", ROUTES)
async def test_a_missing_model_counts_against_the_rate(tmp_path, route):
    async with hostile_world(tmp_path, limits=TINY_RATE) as gw:
        body = BODIES[route]("ghost")
        first = await gw.client.post(ROUTES[route], json=body, headers=gw.tenant)
        assert first.status_code == 404
        hammering = [await gw.client.post(ROUTES[route], json=body, headers=gw.tenant) for _ in range(5)]
        assert [r.status_code for r in hammering] == [429] * 5
        assert all(int(r.headers["retry-after"]) >= 1 for r in hammering)
        assert gw.app.state.tenants.in_flight("t") == 0


async def test_forty_merged_adapters_requests_at_a_tiny_rate_compose_at_most_once(tmp_path):
    async with hostile_world(tmp_path, limits=TINY_RATE) as gw:
        stored = stored_adapters(gw)
        statuses = []
        for i in range(40):
            merge = {"ids": ["mine", "other"], "weights": [1.0, (i + 1) / 100]}
            body = {"inputs": "x", "parameters": {"merged_adapters": merge, "max_new_tokens": 1}}
            statuses.append((await gw.client.post("/generate", json=body, headers=gw.tenant)).status_code)
        assert statuses == [200] + [429] * 39
        assert gw.app.state.merged_adapters.composed <= 1
        assert len(stored_adapters(gw) - stored) <= 1 and staging_left(gw) == []


async def test_uploads_and_compositions_are_admitted_before_anything_is_stored(tmp_path):
    async with hostile_world(tmp_path, limits=TINY_RATE) as gw:
        first = await gw.client.post(
            "/v1/adapters",
            data={"name": "third"},
            files=files_of(make_adapter(tmp_path / "3", seed=3)),
            headers=gw.tenant,
        )
        assert first.status_code == 201, first.text
        stored, registered = stored_adapters(gw), gw.registry.count("t")
        again = await gw.client.post(
            "/v1/adapters",
            data={"name": "fourth"},
            files=files_of(make_adapter(tmp_path / "4", seed=4)),
            headers=gw.tenant,
        )
        assert again.status_code == 429, again.text
        composed = await gw.client.post(
            "/v1/adapters",
            json={"name": "both", "compose": {"adapters": ["mine", "other"], "method": "cat"}},
            headers=gw.tenant,
        )
        assert composed.status_code == 429, composed.text
        assert stored_adapters(gw) == stored and gw.registry.count("t") == registered
        assert staging_left(gw) == [] and gw.app.state.tenants.in_flight("t") == 0


LONG = "x" * 100_000  # well under --max-body-bytes; the fake engine's context is 64 tokens


@pytest.mark.parametrize("route", ROUTES)
async def test_a_prompt_is_bounded_in_characters_before_it_is_tokenized(tmp_path, route):
    async with hostile_world(tmp_path) as gw:
        if route == "chat":
            body = BODIES[route](messages=[{"role": "system", "content": "y"}, {"role": "user", "content": LONG}])
        elif route == "completions":
            body = BODIES[route](prompt=LONG)
        else:
            body = BODIES[route](inputs=LONG)
        response = await gw.client.post(ROUTES[route], json=body, headers=gw.tenant)
        assert response.status_code == (422 if route == "generate" else 400), response.text
        message = response.json()["error"] if route == "generate" else response.json()["error"]["message"]
        assert re.search(r"10000[01] characters", message) and "--max-prompt-chars" in message and "2048" in message
        assert gw.engine.tokenized == [] and gw.engine.generated == []


async def test_the_prompt_bound_is_a_setting(tmp_path):
    async with hostile_world(tmp_path, max_prompt_chars=10) as gw:
        refused = await gw.client.post(
            "/v1/completions", json=BODIES["completions"](prompt="y" * 11), headers=gw.tenant
        )
        assert refused.status_code == 400 and "--max-prompt-chars" in refused.json()["error"]["message"]
        fits = await gw.client.post("/v1/completions", json=BODIES["completions"](prompt="y" * 10), headers=gw.tenant)
        assert fits.status_code == 200


@pytest.mark.parametrize("route", ROUTES)
async def test_tokenizing_runs_off_the_event_loop(tmp_path, route):
    async with hostile_world(tmp_path) as gw:
        text = "z" * 1500  # within the character bound; over the context, which the tokens then show
        if route == "chat":
            body = BODIES[route](messages=[{"role": "user", "content": text}])
        elif route == "completions":
            body = BODIES[route](prompt=text)
        else:
            body = BODIES[route](inputs=text)
        response = await gw.client.post(ROUTES[route], json=body, headers=gw.tenant)
        assert response.status_code in (400, 422) and "token" in response.text
        assert gw.engine.tokenized and not any(on_loop for _, on_loop in gw.engine.tokenized)

"""Quotas hold under concurrency: each is checked and taken in one step, in one process and across
gateways sharing one PostgreSQL catalog; write routes are admitted like generation; pins and merges
are limited per tenant.

Each gateway is the whole app over a FakeEngine (tests/conftest.py), on a real catalog and store.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import sqlalchemy as sa

from adapters.database import adapters_table
from adapters.fine_tuning_db import files_table, jobs_table
from tests.adapter_files import make_adapter
from tests.conftest import full_gateway
from tests.routes.test_tenancy import files_of, new_tenant
from tests.security.tenant_world import TRAINING_DATA, eventually, tiny_base, upload_file

FILE_BYTES = 700


def training_file(size: int = FILE_BYTES) -> bytes:
    """A valid chat JSONL file of exactly `size` bytes."""
    line = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": ""}]}
    empty = len(json.dumps(line)) + 1
    lines = [line, json.loads(json.dumps(line))]
    lines[0]["messages"][1]["content"] = "A" * ((size - 2 * empty) // 2)
    lines[1]["messages"][1]["content"] = "B" * (size - 2 * empty - (size - 2 * empty) // 2)
    raw = "".join(json.dumps(row) + "\n" for row in lines).encode()
    assert len(raw) == size
    return raw


def count_rows(gw, table: sa.Table, owner: str) -> int:
    with gw.registry.catalog.raw_engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table).where(table.c.owner == owner)).scalar_one()


def file_bytes(gw, owner: str) -> int:
    total = sa.select(sa.func.coalesce(sa.func.sum(files_table.c.bytes), 0)).where(files_table.c.owner == owner)
    with gw.registry.catalog.raw_engine.connect() as conn:
        return conn.execute(total).scalar_one()


async def limit(gw, tenant: str, **limits) -> None:
    response = await gw.client.patch(f"/v1/tenants/{tenant}", json={"limits": limits}, headers=gw.admin)
    assert response.status_code == 200, response.text


def refusals_are_openai_429s(responses, code: str) -> None:
    for response in responses:
        assert response.status_code == 429, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
        assert int(response.headers["retry-after"]) >= 1


async def upload_at_once(gateways_and_keys, adapters: list[Path]):
    """One upload of each adapter, all at once, spread over the gateways in turn."""
    calls = []
    for i, folder in enumerate(adapters):
        gw, key = gateways_and_keys[i % len(gateways_and_keys)]
        calls.append(gw.client.post("/v1/adapters", data={"name": f"a{i}"}, files=files_of(folder), headers=key))
    return await asyncio.gather(*calls)


def twenty_adapters(tmp_path: Path) -> list[Path]:
    return [make_adapter(tmp_path / f"up{i}", seed=100 + i) for i in range(20)]


async def test_twenty_uploads_at_once_against_max_adapters_2_register_exactly_2(tmp_path):
    adapters = twenty_adapters(tmp_path)
    async with full_gateway(tmp_path / "state") as gw:
        acme = gw.as_(await new_tenant(gw, "acme"))
        await limit(gw, "acme", max_adapters=2, max_concurrent=100, requests_per_second=1000)
        loaded = len(gw.engine.added)
        responses = await upload_at_once([(gw, acme)], adapters)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] * 2 + [429] * 18, statuses
        refusals_are_openai_429s([r for r in responses if r.status_code == 429], "quota_exceeded")
        assert gw.registry.count("acme") == 2 and count_rows(gw, adapters_table, "acme") == 2
        assert len(gw.engine.added) == loaded  # registrations load on their first request
        stored = {content_hash for content_hash, _ in gw.registry.store.local_objects()}
        assert stored == {e.spec.content_hash for e in gw.registry.entries({"acme"})}  # the refused never stored
        # Replacing one of the two is no new adapter.
        kept = next(r.json()["name"] for r in responses if r.status_code == 201)
        again = await gw.client.post("/v1/adapters", data={"name": kept}, files=files_of(adapters[0]), headers=acme)
        assert again.status_code == 201, again.text


async def test_twenty_uploads_split_over_two_gateways_on_one_postgresql_catalog_register_exactly_2(
    tmp_path, postgres_url
):
    adapters = twenty_adapters(tmp_path)
    (tmp_path / "store").mkdir()
    common = {"catalog_url": postgres_url, "store_url": f"file://{tmp_path / 'store'}"}
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(full_gateway(tmp_path / "a", **common))
        b = await stack.enter_async_context(full_gateway(tmp_path / "b", **common))
        acme_key = await new_tenant(a, "acme")
        await limit(a, "acme", max_adapters=2, max_concurrent=100, requests_per_second=1000)
        await eventually(
            lambda: b.app.state.tenants.exists("acme") and b.app.state.tenants.limits("acme").max_adapters == 2
        )
        responses = await upload_at_once([(a, a.as_(acme_key)), (b, b.as_(acme_key))], adapters)
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [201] * 2 + [429] * 18, statuses
        refusals_are_openai_429s([r for r in responses if r.status_code == 429], "quota_exceeded")
        assert count_rows(a, adapters_table, "acme") == 2
        await eventually(lambda: a.registry.count("acme") == 2 and b.registry.count("acme") == 2)


@pytest.fixture
async def tuned(tmp_path):
    """A gateway with fine-tuning on (a tiny base folder) that runs no job, so jobs stay queued."""
    async with full_gateway(tmp_path / "state", model=str(tiny_base(tmp_path / "base")), max_training_jobs=0) as gw:
        yield gw


async def test_ten_files_of_700_bytes_at_once_against_max_file_bytes_1000_store_one(tuned):
    acme = tuned.as_(await new_tenant(tuned, "acme"))
    await limit(tuned, "acme", max_file_bytes=1000, max_concurrent=100, requests_per_second=1000)
    raw = training_file()
    calls = [
        tuned.client.post("/v1/files", files={"file": ("t.jsonl", raw)}, data={"purpose": "fine-tune"}, headers=acme)
        for _ in range(10)
    ]
    responses = await asyncio.gather(*calls)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [413] * 9, statuses
    refused = next(r for r in responses if r.status_code == 413).json()["error"]
    assert refused["code"] == "file_too_large" and "delete files" in refused["message"], refused
    assert file_bytes(tuned, "acme") == FILE_BYTES and count_rows(tuned, files_table, "acme") == 1
    listed = (await tuned.client.get("/v1/files", headers=acme)).json()["data"]
    assert len(listed) == 1


async def test_thirty_job_creates_at_once_against_max_queued_jobs_2_create_exactly_2(tuned):
    acme = tuned.as_(await new_tenant(tuned, "acme"))
    file_id = await upload_file(tuned, acme)
    await limit(tuned, "acme", max_queued_jobs=2, max_concurrent=100, requests_per_second=1000)
    body = {"model": "base", "training_file": file_id}
    responses = await asyncio.gather(
        *[tuned.client.post("/v1/fine_tuning/jobs", json=body, headers=acme) for _ in range(30)]
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 2 + [429] * 28, statuses
    refusals_are_openai_429s([r for r in responses if r.status_code == 429], "quota_exceeded")
    assert count_rows(tuned, jobs_table, "acme") == 2


@pytest.mark.parametrize("route", ["files", "jobs", "adapters"])
async def test_fifty_writes_at_once_at_one_request_per_second_are_not_all_accepted(tuned, tmp_path, route):
    acme = tuned.as_(await new_tenant(tuned, "acme"))
    file_id = await upload_file(tuned, acme)
    adapter = make_adapter(tmp_path / "adapter", seed=5)
    await limit(tuned, "acme", requests_per_second=1, max_queued_jobs=100, max_adapters=100)

    def call(i: int):
        if route == "files":
            return tuned.client.post(
                "/v1/files", files={"file": ("t.jsonl", TRAINING_DATA)}, data={"purpose": "fine-tune"}, headers=acme
            )
        if route == "jobs":
            return tuned.client.post(
                "/v1/fine_tuning/jobs", json={"model": "base", "training_file": file_id}, headers=acme
            )
        return tuned.client.post("/v1/adapters", data={"name": f"a{i}"}, files=files_of(adapter), headers=acme)

    started = time.monotonic()
    responses = await asyncio.gather(*[call(i) for i in range(50)])
    elapsed = time.monotonic() - started
    accepted = [r for r in responses if r.status_code in (200, 201)]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) + len(refused) == 50, [r.text for r in responses if r not in accepted + refused]
    # A burst of one, and one more for each second the fifty took on a busy machine.
    assert len(accepted) <= 1 + math.ceil(elapsed), (len(accepted), elapsed)
    refusals_are_openai_429s(refused, "rate_limit_exceeded")
    assert tuned.app.state.tenants.in_flight("acme") == 0


async def test_a_tenant_pins_at_most_max_pinned_and_tenants_at_most_half_the_cache(tmp_path):
    async with full_gateway(tmp_path / "state", max_cpu_loras=4) as gw:
        keys = {name: gw.as_(await new_tenant(gw, name)) for name in ("a", "b", "c")}
        await limit(gw, "a", max_pinned=3)
        for n, (name, headers) in enumerate(keys.items()):
            for i in range(3):
                folder = make_adapter(tmp_path / f"{name}{i}", seed=10 * n + i)
                response = await gw.client.post(
                    "/v1/adapters", data={"name": f"p{i}"}, files=files_of(folder), headers=headers
                )
                assert response.status_code == 201, response.text
        # Five pins at once from a tenant allowed three, while the cache (4) leaves tenants two.
        pins = [gw.client.post(f"/v1/adapters/p{i % 3}/pin", headers=keys["a"]) for i in range(5)]
        statuses = [r.status_code for r in await asyncio.gather(*pins)]
        pinned_a = [e.name for e in gw.registry.entries({"a"}) if e.pinned]
        assert len(pinned_a) == 2, (pinned_a, statuses)
        refused = await gw.client.post("/v1/adapters/p0/pin", headers=keys["b"])
        refusals_are_openai_429s([refused], "quota_exceeded")
        assert "half of --max-cpu-loras" in refused.json()["error"]["message"]
        # One unpinned leaves room for b's one, and b's default max_pinned (1) holds it there.
        assert (await gw.client.post(f"/v1/adapters/{pinned_a[0]}/unpin", headers=keys["a"])).status_code == 200
        assert (await gw.client.post("/v1/adapters/p0/pin", headers=keys["b"])).status_code == 200
        assert (await gw.client.post("/v1/adapters/p0/unpin", headers=keys["b"])).status_code == 200
        assert (await gw.client.post("/v1/adapters/p1/pin", headers=keys["c"])).status_code == 200
        assert (await gw.client.post("/v1/adapters/p2/pin", headers=keys["c"])).status_code == 429  # c's max_pinned
        # The admin is not held to tenants' limits.
        assert (await gw.client.post("/v1/adapters/c/p2/pin", headers=gw.admin)).status_code == 200
        with gw.registry.catalog.raw_engine.connect() as conn:
            pinned_rows = conn.execute(
                sa.select(adapters_table.c.owner, adapters_table.c.name).where(adapters_table.c.pinned == sa.true())
            ).all()
        assert sorted(pinned_rows) == sorted([("a", pinned_a[1]), ("c", "p1"), ("c", "p2")]), pinned_rows


async def test_a_tenants_merges_never_push_out_anothers_and_evicted_merges_leave_no_files(tmp_path):
    async with full_gateway(tmp_path / "state", zero_adapter=False) as gw:
        keys = {name: gw.as_(await new_tenant(gw, name)) for name in ("greedy", "modest")}
        for n, (name, headers) in enumerate(keys.items()):
            for i, adapter in enumerate(("x", "y")):
                folder = make_adapter(tmp_path / f"{name}-{adapter}", seed=10 * n + i)
                response = await gw.client.post(
                    "/v1/adapters", data={"name": adapter}, files=files_of(folder), headers=headers
                )
                assert response.status_code == 201, response.text
        await limit(gw, "greedy", max_merges=2, requests_per_second=1000)

        async def merge(tenant: str, weight: float):
            parameters = {"merged_adapters": {"ids": ["x", "y"], "weights": [1.0, weight]}, "max_new_tokens": 1}
            response = await gw.client.post(
                "/generate", json={"inputs": "x", "parameters": parameters}, headers=keys[tenant]
            )
            assert response.status_code == 200, response.text

        await merge("modest", 0.5)
        cache = gw.app.state.merged_adapters
        (modest_merge,) = cache.entries()
        for i in range(20):  # more than the shared bound (16) of merges
            await merge("greedy", (i + 1) / 100)
        assert len(cache.owned("greedy")) == 2
        assert modest_merge in cache.entries() and not modest_merge.retired
        assert cache.composed == 21 and cache.files_deleted == 18
        store_root = gw.registry.store.root
        kept = {entry.spec.content_hash for entry in cache.entries()}
        registered = {entry.spec.content_hash for entry in gw.registry.entries()}
        folders = {p.name for p in store_root.iterdir() if not p.name.startswith(".")}
        assert folders == kept | registered

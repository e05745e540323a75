"""Deleting a tenant removes everything it owned, on every gateway of the catalog; a reused name starts empty.

Each gateway is the whole app over a FakeEngine, with fine-tuning on (a tiny base folder) and a
runner that trains nothing (tests/security/tenant_world.py), on a real catalog and a real store.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

import adapters.blobs
from tests.adapter_files import make_adapter
from tests.conftest import full_gateway
from tests.security.tenant_world import (
    TRAINING_DATA,
    FakeRunner,
    FlakyBlobs,
    checkpoint_keys,
    create_job,
    eventually,
    install_runner,
    job_status,
    new_tenant,
    rows_of,
    sees_nothing,
    shared_urls_for,
    tiny_base,
    upload_adapter,
    upload_file,
)

NOTHING = {"tenants": 0, "api_keys": 0, "adapters": 0, "files": 0, "jobs": 0, "events": 0, "checkpoints": 0}
MERGE = {"merged_adapters": {"ids": ["mine", "second"], "weights": [0.5, 0.5]}, "max_new_tokens": 1}


@pytest.fixture(params=["sqlite+folder", "postgresql+s3"])
def shared_urls(request, tmp_path):
    return shared_urls_for(request.param, request, tmp_path)


def settings_for(tmp_path: Path, **overrides) -> dict:
    base = tiny_base(tmp_path / "base")
    return {"model": str(base), "store_grace_seconds": 0, "store_sweep_seconds": 0, "max_cpu_loras": 4} | overrides


async def generate(gw, headers, parameters: dict):
    return await gw.client.post("/generate", json={"inputs": "x", "parameters": parameters}, headers=headers)


async def complete(gw, headers, model: str):
    return await gw.client.post(
        "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1}, headers=headers
    )


async def test_deleting_a_tenant_removes_all_it_owned_and_a_new_one_of_its_name_starts_empty(tmp_path):
    state = tmp_path / "state"
    async with full_gateway(state, **settings_for(tmp_path, max_training_jobs=1)) as gw:
        runner = install_runner(gw, FakeRunner(make_adapter(tmp_path / "tuned", seed=11), hold=False))
        acme, other = await new_tenant(gw, "acme"), await new_tenant(gw, "other")
        file_id = await upload_file(gw, acme)
        done = await create_job(gw, acme, file_id)

        async def succeeded():
            return await job_status(gw, acme, done) == "succeeded"

        await eventually(succeeded, within=10)
        finished = (await gw.client.get(f"/v1/fine_tuning/jobs/{done}", headers=acme)).json()
        tuned, results_id = finished["fine_tuned_model"], finished["result_files"][0]
        runner.hold = True
        running = await create_job(gw, acme, file_id)
        await eventually(lambda: running in runner.started)
        mine = await upload_adapter(gw, acme, "mine", make_adapter(tmp_path / "mine", seed=1))
        second = await upload_adapter(gw, acme, "second", make_adapter(tmp_path / "second", seed=2))
        theirs = await upload_adapter(gw, other, "same", make_adapter(tmp_path / "same", seed=2))
        assert theirs == second  # one stored copy, two rows
        assert (await generate(gw, acme, MERGE)).status_code == 200
        merged = gw.app.state.merged_adapters.entries()[0]
        assert (await complete(gw, acme, tuned)).status_code == 200
        assert (await gw.client.get("/v1/usage", headers=acme)).json()["data"] != []
        jobs = [done, running]
        keys = checkpoint_keys(gw.registry.catalog, jobs)
        tuned_hash = gw.registry.find("acme", tuned).spec.content_hash
        assert len(keys) == 2 and all((state / "files" / key).is_file() for key in keys)
        cache = state / "adapters"
        assert all((cache / h).is_dir() for h in (mine, second, tuned_hash, merged.spec.content_hash))

        deleted = await gw.client.delete("/v1/tenants/acme", headers=gw.admin)

        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["removed"] == {
            "adapters": 3,
            "files": 2,
            "fine_tuning_jobs": 2,
            "checkpoints": 2,
            "merges": 1,
        }
        assert runner.stopped == [running]
        assert rows_of(gw.registry.catalog, "acme", jobs) == NOTHING
        for key in [f"files/{file_id}", f"files/{results_id}", *keys]:
            assert not (state / "files" / key).exists(), key
        for content_hash in (mine, tuned_hash, merged.spec.content_hash):
            assert not (cache / content_hash).exists()
        assert (cache / second).is_dir()  # other's 'same' is the same content
        assert gw.app.state.merged_adapters.entries() == [] and merged.retired
        assert (await gw.client.get("/v1/models", headers=acme)).status_code == 401
        assert (await complete(gw, other, "same")).status_code == 200

        again = await new_tenant(gw, "acme")
        await sees_nothing(gw, again, [file_id, results_id], jobs, [tuned, "mine", "second"])


async def test_a_job_that_finishes_after_its_tenant_was_deleted_registers_nothing(tmp_path):
    state = tmp_path / "state"
    async with full_gateway(state, **settings_for(tmp_path, max_training_jobs=1)) as gw:
        runner = install_runner(gw, FakeRunner(make_adapter(tmp_path / "tuned", seed=11)))
        acme = await new_tenant(gw, "acme")
        file_id = await upload_file(gw, acme)
        job = await create_job(gw, acme, file_id)
        runner.stubborn.add(job)
        await eventually(lambda: job in runner.started)

        deleting = asyncio.create_task(gw.client.delete("/v1/tenants/acme", headers=gw.admin))
        await eventually(lambda: "acme" not in gw.registry.catalog.tenants())
        runner.finish.set()  # training ends now, its tenant gone: the result must go nowhere
        assert (await deleting).status_code == 200
        await gw.app.state.fine_tuning.scheduler.wait_finished(job, 10)

        assert runner.stopped == [job]
        assert rows_of(gw.registry.catalog, "acme", [job]) == NOTHING
        assert gw.registry.entries({"acme"}) == []
        assert list((state / "files" / "files").iterdir()) == []  # nor a results file
        again = await new_tenant(gw, "acme")
        await sees_nothing(gw, again, [file_id], [job], [])


async def test_a_deletion_through_one_gateway_is_honoured_on_another(tmp_path, shared_urls):
    catalog_url, store_url = shared_urls
    common = settings_for(tmp_path, catalog_url=catalog_url, store_url=store_url)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(full_gateway(tmp_path / "a", **common, max_training_jobs=0))
        b = await stack.enter_async_context(full_gateway(tmp_path / "b", **common, max_training_jobs=2))
        runner = install_runner(b, FakeRunner(make_adapter(tmp_path / "tuned", seed=11)))
        acme = await new_tenant(a, "acme")
        await eventually(lambda: b.app.state.tenants.exists("acme"))
        file_id = await upload_file(a, acme)
        cancelled = await create_job(a, acme, file_id)
        stubborn = await create_job(a, acme, file_id)
        runner.stubborn.add(stubborn)
        await eventually(lambda: {cancelled, stubborn} <= set(runner.started), within=10)
        hashes = [
            await upload_adapter(a, acme, "mine", make_adapter(tmp_path / "mine", seed=1)),
            await upload_adapter(a, acme, "second", make_adapter(tmp_path / "second", seed=2)),
        ]
        await eventually(lambda: b.registry.count("acme") == 2)
        assert (await generate(b, acme, MERGE)).status_code == 200
        assert (await complete(b, acme, "mine")).status_code == 200
        hashes.append(b.app.state.merged_adapters.entries()[0].spec.content_hash)
        b_cache = tmp_path / "b" / "adapters"
        assert all((b_cache / h).is_dir() for h in hashes)  # fetched from the store, and composed, on b
        assert (await b.client.get("/v1/usage", headers=acme)).json()["data"] != []
        blobs = a.registry.store.blobs
        keys = [f"files/{file_id}", *checkpoint_keys(a.registry.catalog, [cancelled, stubborn])]
        assert len(keys) == 3 and all(blobs.exists(key) for key in keys)

        assert (await a.client.delete("/v1/tenants/acme", headers=a.admin)).status_code == 200
        again = await new_tenant(a, "acme")  # the name is taken again at once

        await eventually(lambda: {cancelled, stubborn} <= set(runner.stopped))
        runner.finish.set()  # the stubborn job ends after its tenant was deleted and its name reused
        await b.app.state.fine_tuning.scheduler.wait_finished(stubborn, 10)
        await eventually(lambda: b.app.state.merged_adapters.entries() == [] and b.registry.count("acme") == 0)
        await eventually(lambda: not any((b_cache / h).exists() for h in hashes))  # b's own cache too
        assert rows_of(a.registry.catalog, "acme", [cancelled, stubborn]) == NOTHING | {"tenants": 1, "api_keys": 1}
        assert not any(blobs.exists(key) for key in keys)
        assert (await b.client.get("/v1/models", headers=acme)).status_code == 401

        async def new_key_works_on_b():
            return (await b.client.get("/v1/models", headers=again)).status_code == 200

        await eventually(new_key_works_on_b)
        for gw in (a, b):
            await sees_nothing(gw, again, [file_id], [cancelled, stubborn], ["mine", "second"])


async def test_a_store_down_during_deletion_is_a_503_the_catalog_is_done_and_the_sweep_takes_the_bytes(
    tmp_path, monkeypatch
):
    real = adapters.blobs.open_blobs
    opened: list[FlakyBlobs] = []

    def open_flaky(url):
        opened.append(FlakyBlobs(real(url)))
        return opened[-1]

    monkeypatch.setattr(adapters.blobs, "open_blobs", open_flaky)
    shared = tmp_path / "shared"
    shared.mkdir()
    async with full_gateway(tmp_path / "state", **settings_for(tmp_path, store_url=f"file://{shared}")) as gw:
        acme = await new_tenant(gw, "acme")
        file_id = await upload_file(gw, acme)
        mine = await upload_adapter(gw, acme, "mine", make_adapter(tmp_path / "mine", seed=1))
        adapter_object = shared / "adapters" / f"{mine}.tar"
        assert (shared / "files" / file_id).is_file() and adapter_object.is_file()
        (store,) = opened
        store.down = True

        response = await gw.client.delete("/v1/tenants/acme", headers=gw.admin)

        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "store_unavailable" and error["type"] == "service_unavailable_error"
        assert "'acme' is deleted" in error["message"] and "sweep" in error["message"]
        assert str(shared) not in response.text
        # Nothing is half-deleted in the catalog: all of acme is gone, and its key with it.
        assert rows_of(gw.registry.catalog, "acme", []) == NOTHING
        assert (await gw.client.get("/v1/files", headers=acme)).status_code == 401
        assert (shared / "files" / file_id).is_file()  # the bytes wait for the store

        store.down = False
        await asyncio.to_thread(gw.app.state.store_sweep.sweep, set())
        assert not (shared / "files" / file_id).exists() and not adapter_object.exists()


async def test_a_database_down_during_deletion_is_a_503_that_changes_nothing(tmp_path, postgres_server, s3_env):
    catalog_url = postgres_server.new_database()
    async with full_gateway(
        tmp_path / "state", **settings_for(tmp_path, catalog_url=catalog_url, store_url=s3_env.url)
    ) as gw:
        acme = await new_tenant(gw, "acme")
        file_id = await upload_file(gw, acme)
        await upload_adapter(gw, acme, "mine", make_adapter(tmp_path / "mine", seed=1))
        blobs = gw.registry.store.blobs
        postgres_server.stop()
        try:
            response = await gw.client.delete("/v1/tenants/acme", headers=gw.admin)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "catalog_unavailable"
        finally:
            postgres_server.start()

        async def files_back():
            answer = await gw.client.get(f"/v1/files/{file_id}/content", headers=acme)
            return answer.status_code == 200 and answer.content == TRAINING_DATA

        await eventually(files_back, within=15)  # nothing changed: acme, its key, its file and its bytes
        assert (await complete(gw, acme, "mine")).status_code == 200

        assert (await gw.client.delete("/v1/tenants/acme", headers=gw.admin)).status_code == 200
        assert rows_of(gw.registry.catalog, "acme", []) == NOTHING
        assert not blobs.exists(f"files/{file_id}")

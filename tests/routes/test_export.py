"""POST /v1/adapters/{name}/export: a background merge into --export-dir, and its status."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from adapters.merge import merge_adapter
from tests.adapter_files import make_adapter
from tests.conftest import full_gateway
from tests.routes.test_tenancy import new_tenant, upload
from tests.test_merge import make_tiny_model

pytestmark = pytest.mark.imports("peft")  # in this process: see tests/conftest.py

JOB_SECONDS = 180


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


async def wait_for(gw, job_id: str) -> dict:
    deadline = time.monotonic() + JOB_SECONDS
    while time.monotonic() < deadline:
        job = (await gw.client.get(f"/v1/exports/{job_id}", headers=gw.admin)).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"export {job_id} not done in {JOB_SECONDS} s")


async def test_export_writes_the_merged_model_in_the_background(tiny_model, tmp_path):
    exports = tmp_path / "exports"
    source = make_adapter(tmp_path / "support", rank=8, targets=("q_proj", "v_proj"))
    async with full_gateway(tmp_path / "state", model=str(tiny_model), export_dir=exports) as gw:
        registered = await gw.client.post(
            "/v1/adapters", json={"name": "support", "path": str(source)}, headers=gw.admin
        )
        content_hash = registered.json()["content_hash"].removeprefix("sha256:")
        response = await gw.client.post("/v1/adapters/support/export", headers=gw.admin)
        assert response.status_code == 202, response.text
        job = response.json()
        assert response.headers["location"] == f"/v1/exports/{job['id']}"
        assert (job["adapter"], job["status"], job["folder"]) == ("support", "queued", f"support-{content_hash[:12]}")
        # serving goes on meanwhile: the merge runs in a process of its own
        completion = await gw.client.post(
            "/v1/completions", json={"model": "support", "prompt": "hi", "max_tokens": 1}, headers=gw.admin
        )
        assert completion.status_code == 200
        done = await wait_for(gw, job["id"])
        assert done["status"] == "succeeded", done
        assert done["error"] is None and done["finished_at"] >= done["started_at"] >= done["created_at"]
        listed = (await gw.client.get("/v1/exports", headers=gw.admin)).json()["data"]
        assert [j["id"] for j in listed] == [job["id"]]
        assert str(tmp_path) not in str(listed)

        # the same files again: the folder is there, so the job is done at once
        again = (await gw.client.post("/v1/adapters/support/export", headers=gw.admin)).json()
        assert again["id"] != job["id"] and again["status"] == "succeeded" and again["folder"] == job["folder"]

    folder = exports / job["folder"]
    assert sorted(p.name for p in exports.iterdir()) == [job["folder"]]  # nothing half-written beside it
    merge_adapter(tiny_model, source, tmp_path / "cli", progress=False)
    ours, theirs = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "cli" / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0) for k in ours)
    assert (folder / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


async def test_exports_are_for_the_admin_and_off_without_export_dir(full, tiny_model, tmp_path):
    response = await full.client.post("/v1/adapters/anything/export", headers=full.admin)
    assert response.status_code == 409
    assert (
        response.json()["error"]["code"] == "exports_disabled" and "--export-dir" in response.json()["error"]["message"]
    )

    async with full_gateway(tmp_path / "state2", model=str(tiny_model), export_dir=tmp_path / "exports") as gw:
        key = await new_tenant(gw, "acme")
        assert (await upload(gw, key, "mine", make_adapter(tmp_path / "mine"))).status_code == 201
        assert (await gw.client.post("/v1/adapters/mine/export", headers=gw.as_(key))).status_code == 403
        assert (await gw.client.get("/v1/exports", headers=gw.as_(key))).status_code == 403
        unknown = await gw.client.post("/v1/adapters/ghost/export", headers=gw.admin)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "adapter_not_found"
        assert (await gw.client.post("/v1/adapters/base/export", headers=gw.admin)).status_code == 400
        bad_dtype = await gw.client.post("/v1/adapters/acme/mine/export", json={"dtype": "int8"}, headers=gw.admin)
        assert bad_dtype.status_code == 400 and bad_dtype.json()["error"]["param"] == "dtype"
        no_job = await gw.client.get("/v1/exports/export-nope", headers=gw.admin)
        assert no_job.status_code == 404 and no_job.json()["error"]["code"] == "export_not_found"
        paths = await gw.client.post("/v1/adapters/acme/mine/export", json={"out": "/etc"}, headers=gw.admin)
        assert paths.status_code == 400  # no caller-given paths
        # a tenant's adapter, named as the admin names it; its folder says whose it is
        job = (await gw.client.post("/v1/adapters/acme/mine/export", headers=gw.admin)).json()
        assert job["adapter"] == "acme/mine" and job["folder"].startswith("acme.mine-")
    # the gateway stopped: a job still running was stopped with it, and left nothing half-written
    assert not list((tmp_path / "exports").glob(".*"))


async def test_a_failed_merge_says_so_without_server_paths(tiny_model, tmp_path):
    broken = tmp_path / "broken-base"
    broken.mkdir()
    shutil.copy(tiny_model / "config.json", broken)  # the right shapes, but no weights and no tokenizer
    async with full_gateway(tmp_path / "state", model=str(broken), export_dir=tmp_path / "exports") as gw:
        source = make_adapter(tmp_path / "support")
        await gw.client.post("/v1/adapters", json={"name": "support", "path": str(source)}, headers=gw.admin)
        job = (await gw.client.post("/v1/adapters/support/export", headers=gw.admin)).json()
        done = await wait_for(gw, job["id"])
    assert done["status"] == "failed"
    assert done["error"] == "the merge process exited with status 2; the gateway's log has its output"
    assert not list((tmp_path / "exports").iterdir())

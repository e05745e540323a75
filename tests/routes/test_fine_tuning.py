"""The files and fine-tuning jobs API over a FakeEngine: shapes, validation, tenancy, cancel, restarts.

Training itself (the worker process on the demo model) runs in tests/engine/test_fine_tuning.py and
tests/test_training_worker.py; here no job is started unless a test says so.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from adapters.fine_tuning_db import FineTuningRecords
from tests.conftest import full_gateway

CHAT = [
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A tuned model."}]}
] * 4


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
async def tuned(tmp_path, demo):
    async with full_gateway(tmp_path / "state", model=str(demo.base), max_training_jobs=0) as gateway:
        yield gateway


async def tenant_key(gw, name: str) -> dict[str, str]:
    response = await gw.client.post("/v1/tenants", json={"name": name}, headers=gw.admin)
    assert response.status_code == 201, response.text
    return gw.as_(response.json()["api_key"])


async def upload(gw, headers, raw: bytes, purpose: str = "fine-tune", filename: str = "train.jsonl"):
    return await gw.client.post(
        "/v1/files", files={"file": (filename, raw)}, data={"purpose": purpose}, headers=headers
    )


async def wait_status(gw, job_id: str, headers, statuses: set[str], timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = (await gw.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)).json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.2)


async def test_files_round_trip_and_belong_to_their_tenant(tuned):
    acme, other = await tenant_key(tuned, "acme"), await tenant_key(tuned, "other")
    raw = jsonl(CHAT)
    response = await upload(tuned, acme, raw)
    assert response.status_code == 200, response.text
    card = response.json()
    assert (card["object"], card["bytes"], card["purpose"], card["filename"], card["status"]) == (
        "file",
        len(raw),
        "fine-tune",
        "train.jsonl",
        "processed",
    )
    file_id = card["id"]
    assert (await tuned.client.get(f"/v1/files/{file_id}/content", headers=acme)).content == raw
    assert [f["id"] for f in (await tuned.client.get("/v1/files", headers=acme)).json()["data"]] == [file_id]
    assert (await tuned.client.get("/v1/files", headers=other)).json()["data"] == []
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        answer = await tuned.client.request(method, f"/v1/files/{file_id}{path}", headers=other)
        missing = await tuned.client.request(method, f"/v1/files/file-nope{path}", headers=other)
        assert answer.status_code == missing.status_code == 404
        assert answer.json()["error"]["code"] == "file_not_found"
    deleted = await tuned.client.delete(f"/v1/files/{file_id}", headers=acme)
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert (await tuned.client.get(f"/v1/files/{file_id}", headers=acme)).status_code == 404


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (b"", "empty"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\nnot json\n',
            "line 2",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n', "bot"),
        (b"\xff\xfe\x00binary", "UTF-8"),
    ],
)
async def test_bad_files_are_refused_with_where(tuned, raw, phrase):
    response = await upload(tuned, tuned.admin, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_training_file" and phrase in error["message"], error
    assert (await tuned.client.get("/v1/files", headers=tuned.admin)).json()["data"] == []


async def test_purpose_and_size_limits(tuned):
    assert (await upload(tuned, tuned.admin, jsonl(CHAT), purpose="batch")).status_code == 400
    acme = await tenant_key(tuned, "acme")
    patched = await tuned.client.patch(
        "/v1/tenants/acme", json={"limits": {"max_file_bytes": 1000}}, headers=tuned.admin
    )
    assert patched.status_code == 200, patched.text
    assert (await upload(tuned, acme, jsonl(CHAT))).status_code == 200
    again = await upload(tuned, acme, jsonl(CHAT * 2))
    assert again.status_code == 413 and "delete files" in again.json()["error"]["message"]


async def create_job(gw, headers, file_id: str, **extra):
    body = {"model": "base", "training_file": file_id} | extra
    return await gw.client.post("/v1/fine_tuning/jobs", json=body, headers=headers)


async def test_a_job_is_validated_queued_listed_and_cancelled(tuned):
    acme, other = await tenant_key(tuned, "acme"), await tenant_key(tuned, "other")
    file_id = (await upload(tuned, acme, jsonl(CHAT))).json()["id"]
    hyper = {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 3}
    response = await create_job(
        tuned,
        acme,
        file_id,
        suffix="pirate",
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["object"], job["status"], job["model"], job["training_file"], job["seed"]) == (
        "fine_tuning.job",
        "validating_files",
        "base",
        file_id,
        7,
    )
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 3.0}
    assert job["lora"]["r"] == 8 and job["lora"]["lora_alpha"] == 16 and "down_proj" in job["lora"]["target_modules"]
    queued = await wait_status(tuned, job["id"], acme, {"queued"})
    assert queued["status"] == "queued"  # no --max-training-jobs here: it waits
    for path in ("", "/events", "/checkpoints"):
        assert (await tuned.client.get(f"/v1/fine_tuning/jobs/{job['id']}{path}", headers=other)).status_code == 404
    assert (await tuned.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=other)).status_code == 404
    assert (await tuned.client.get("/v1/fine_tuning/jobs", headers=other)).json()["data"] == []
    events = (await tuned.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=acme)).json()["data"]
    assert [e["message"] for e in events] == [
        "Files validated, moving job to queued state",
        f"Validating training file: {file_id}",
    ]
    cancelled = (await tuned.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=acme)).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = await tuned.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=acme)
    assert again.status_code == 409
    assert (await tuned.client.delete(f"/v1/files/{file_id}", headers=acme)).status_code == 200


async def test_job_lists_page_newest_first(tuned):
    file_id = (await upload(tuned, tuned.admin, jsonl(CHAT))).json()["id"]
    ids = [(await create_job(tuned, tuned.admin, file_id)).json()["id"] for _ in range(3)]
    first = (await tuned.client.get("/v1/fine_tuning/jobs?limit=2", headers=tuned.admin)).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = (await tuned.client.get(f"/v1/fine_tuning/jobs?limit=2&after={ids[1]}", headers=tuned.admin)).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ({"model": "nope"}, 404, "model"),
        ({"training_file": "file-missing"}, 404, "training_file"),
        ({"method": {"type": "dpo"}}, 400, "method.type"),
        ({"lora": {"target_modules": ["wq"]}}, 400, None),
        ({"lora": {"r": 3}}, 400, None),
        ({"hyperparameters": {"n_epochs": 0}}, 400, None),
        ({"suffix": "x" * 60}, 400, "suffix"),
        ({"suffix": "a b"}, 400, "suffix"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, 400, "integrations"),
    ],
)
async def test_bad_jobs_are_refused(tuned, extra, status, param):
    file_id = (await upload(tuned, tuned.admin, jsonl(CHAT))).json()["id"]
    response = await create_job(tuned, tuned.admin, file_id, **extra)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (param is None or error["param"] == param), error
    assert (await tuned.client.get("/v1/fine_tuning/jobs", headers=tuned.admin)).json()["data"] == []


async def test_queued_jobs_per_tenant_are_limited(tuned):
    acme = await tenant_key(tuned, "acme")
    await tuned.client.patch("/v1/tenants/acme", json={"limits": {"max_queued_jobs": 2}}, headers=tuned.admin)
    file_id = (await upload(tuned, acme, jsonl(CHAT))).json()["id"]
    assert [(await create_job(tuned, acme, file_id)).status_code for _ in range(3)] == [200, 200, 429]
    assert (await tuned.client.delete(f"/v1/files/{file_id}", headers=acme)).status_code == 409  # in use


async def test_a_job_left_running_by_a_crash_fails_on_restart(tmp_path, demo):
    state = tmp_path / "state"
    async with full_gateway(state, model=str(demo.base), max_training_jobs=0) as gw:
        file_id = (await upload(gw, gw.admin, jsonl(CHAT))).json()["id"]
        job_id = (await create_job(gw, gw.admin, file_id)).json()["id"]
        records = FineTuningRecords(gw.registry.catalog)
        runner = (state / "gateway-id").read_text().strip()
        # What a gateway killed mid-job leaves behind: the job running, claimed by it.
        assert records.update_job(job_id, status="running", runner=runner, heartbeat_at=time.time())
        lost = (await create_job(gw, gw.admin, file_id)).json()["id"]
        assert records.update_job(lost, status="running", runner="gateway-gone", heartbeat_at=time.time() - 3600)
    async with full_gateway(state, model=str(demo.base), max_training_jobs=0) as gw:
        restarted = await wait_status(gw, job_id, gw.admin, {"failed"})
        assert restarted["status"] == "failed" and restarted["error"]["code"] == "gateway_restarted"
        assert "not resumed" in restarted["error"]["message"]
        vanished = await wait_status(gw, lost, gw.admin, {"failed"})
        assert vanished["status"] == "failed" and vanished["error"]["code"] == "runner_lost"
        scrape = (await gw.client.get("/metrics", headers=gw.admin)).text
        assert 'lora_gateway_fine_tuning_jobs_total{status="failed"} 2.0' in scrape
        assert "lora_gateway_fine_tuning_running 0.0" in scrape


async def test_files_live_in_the_shared_store_and_a_store_down_is_a_503(tmp_path, demo, moto_server, s3_env):
    """Two gateways on one catalog and one S3 store: a file uploaded through one reads through the other."""
    import boto3

    catalog = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    common = {"model": str(demo.base), "max_training_jobs": 0, "catalog_url": catalog, "store_url": s3_env.url}
    async with full_gateway(tmp_path / "one", **common) as one, full_gateway(tmp_path / "two", **common) as two:
        raw = jsonl(CHAT)
        file_id = (await upload(one, one.admin, raw)).json()["id"]
        keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_env.bucket)["Contents"]]
        assert f"{s3_env.prefix}/files/{file_id}" in keys
        assert (await two.client.get(f"/v1/files/{file_id}/content", headers=two.admin)).content == raw
        moto_server.stop()
        try:
            down = await upload(two, two.admin, raw)
            assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
            assert s3_env.bucket not in down.text and "127.0.0.1" not in down.text
        finally:
            moto_server.start()
        assert [f["id"] for f in (await two.client.get("/v1/files", headers=two.admin)).json()["data"]] == [file_id]


async def test_a_file_over_max_file_bytes_is_refused_before_it_is_read(tmp_path, demo):
    async with full_gateway(tmp_path / "state", model=str(demo.base), max_training_jobs=0, max_file_bytes=2048) as gw:
        too_big = await upload(gw, gw.admin, jsonl(CHAT * 200))
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        assert (await upload(gw, gw.admin, jsonl(CHAT))).status_code == 200
        assert len((await gw.client.get("/v1/files", headers=gw.admin)).json()["data"]) == 1

"""The Batch API over a FakeEngine: shapes, input files, tenancy, limits, cancel, expiry, restarts, yielding.

The real engine runs a batch of 50 lines, through the official client, in tests/engine/test_batches.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from adapters.batches_db import BatchRecords
from tests.conftest import full_gateway
from tests.fakes import FakeEngine


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def chat_line(custom_id: str, content: str, model: str = "base", **extra) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 3} | extra
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


class GatedEngine(FakeEngine):
    """A FakeEngine whose first `free` generations run at once and the rest wait for `gate`."""

    def __init__(self, free: int, **kwargs):
        super().__init__(**kwargs)
        self.free = free
        self.gate = asyncio.Event()

    async def generate(self, request_id, prompt_token_ids, options, adapter):
        if self.free > 0:
            self.free -= 1
        else:
            await self.gate.wait()
        async for step in super().generate(request_id, prompt_token_ids, options, adapter):
            yield step


@pytest.fixture
def base(tmp_path):
    """A base model's folder as far as the files API needs one (it reads config.json); the engine is fake."""
    folder = tmp_path / "base-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    return str(folder)


@pytest.fixture
async def gw(tmp_path, base):
    async with full_gateway(tmp_path / "state", model=base, max_training_jobs=0) as gateway:
        yield gateway


async def tenant_key(gw, name: str, **limits) -> dict[str, str]:
    response = await gw.client.post("/v1/tenants", json={"name": name, "limits": limits}, headers=gw.admin)
    assert response.status_code == 201, response.text
    return gw.as_(response.json()["api_key"])


async def upload(gw, headers, raw: bytes, purpose: str = "batch"):
    return await gw.client.post(
        "/v1/files", files={"file": ("in.jsonl", raw)}, data={"purpose": purpose}, headers=headers
    )


async def start_batch(gw, headers, rows, endpoint="/v1/chat/completions", **extra) -> dict:
    uploaded = await upload(gw, headers, jsonl(rows))
    assert uploaded.status_code == 200, uploaded.text
    body = {"input_file_id": uploaded.json()["id"], "endpoint": endpoint, "completion_window": "24h"} | extra
    created = await gw.client.post("/v1/batches", json=body, headers=headers)
    assert created.status_code == 200, created.text
    return created.json()


async def wait_for(gw, batch_id, headers, until, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = (await gw.client.get(f"/v1/batches/{batch_id}", headers=headers)).json()
        if until(batch) or time.monotonic() > deadline:
            return batch
        await asyncio.sleep(0.05)


def finished(batch) -> bool:
    return batch["status"] in ("completed", "failed", "expired", "cancelled")


async def content(gw, headers, file_id) -> list[dict]:
    response = await gw.client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def answer_of(body: dict) -> list:
    return [(c["message"]["content"], c["finish_reason"]) for c in body["choices"]]


async def test_a_batch_answers_as_direct_requests_do_and_counts_its_lines(gw):
    acme = await tenant_key(gw, "acme")
    rows = [chat_line(f"q{i}", f"question {i}", max_tokens=i + 1) for i in range(5)] + [
        chat_line("missing", "hello", model="nope")
    ]
    batch = await start_batch(gw, acme, rows, metadata={"job": "eval"})
    assert (batch["object"], batch["status"], batch["endpoint"], batch["completion_window"]) == (
        "batch",
        "validating",
        "/v1/chat/completions",
        "24h",
    )
    assert batch["request_counts"] == {"total": 6, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"job": "eval"} and batch["expires_at"] - batch["created_at"] == 24 * 3600
    done = await wait_for(gw, batch["id"], acme, finished)
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 6, "completed": 5, "failed": 1}
    assert done["in_progress_at"] and done["finalizing_at"] and done["completed_at"]
    outputs = await content(gw, acme, done["output_file_id"])
    assert [line["custom_id"] for line in outputs] == [f"q{i}" for i in range(5)]
    for line, row in zip(outputs, rows, strict=False):
        direct = await gw.client.post("/v1/chat/completions", json=row["body"], headers=acme)
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["id"].startswith("batch_req_") and line["response"]["request_id"]
        assert answer_of(line["response"]["body"]) == answer_of(direct.json())
        assert line["response"]["body"]["usage"] == direct.json()["usage"]
    (failure,) = await content(gw, acme, done["error_file_id"])
    assert failure["custom_id"] == "missing" and failure["response"]["status_code"] == 404
    assert failure["response"]["body"]["error"]["code"] == "model_not_found"
    files = (await gw.client.get("/v1/files", headers=acme)).json()["data"]
    assert {f["purpose"] for f in files} == {"batch", "batch_output"}


async def test_completions_batches_and_their_endpoint(gw):
    rows = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {"model": "base", "prompt": "hi"}}
        for i in range(3)
    ]
    uploaded = (await upload(gw, gw.admin, jsonl(rows))).json()
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    wrong = await gw.client.post("/v1/batches", json=body, headers=gw.admin)
    assert wrong.status_code == 400 and "/v1/completions" in wrong.json()["error"]["message"]
    for field, value, phrase in (
        ("endpoint", "/v1/embeddings", "not served by this gateway"),
        ("endpoint", "/v1/nowhere", "/v1/chat/completions or /v1/completions or /v1/responses"),
        ("completion_window", "1h", "'24h'"),
    ):
        refused = await gw.client.post("/v1/batches", json=body | {field: value}, headers=gw.admin)
        assert refused.status_code == 400 and phrase in refused.json()["error"]["message"], refused.text
        assert refused.json()["error"]["param"] == field
    batch = await start_batch(gw, gw.admin, rows, endpoint="/v1/completions")
    done = await wait_for(gw, batch["id"], gw.admin, finished)
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    direct = (await gw.client.post("/v1/completions", json=rows[0]["body"], headers=gw.admin)).json()
    outputs = await content(gw, gw.admin, done["output_file_id"])
    assert [line["response"]["body"]["choices"][0]["text"] for line in outputs] == [direct["choices"][0]["text"]] * 3


BAD_FILES = [
    ([chat_line("a", "x"), chat_line("a", "y")], "line 2: custom_id 'a' is used by an earlier line"),
    ([chat_line("a", "x"), chat_line("b", "y") | {"method": "GET"}], "line 2: method must be POST"),
    ([chat_line("a", "x") | {"url": "/v1/embeddings"}], "line 1: url /v1/embeddings is not served"),
    ([chat_line("a", "x") | {"url": "/v1/responses"}], "line 1: body: 'input' is required"),
    (
        [chat_line("a", "x"), {**chat_line("b", "y"), "url": "/v1/completions"}],
        "line 2: url is /v1/completions, but earlier lines use /v1/chat/completions",
    ),
    ([chat_line("a", "x"), chat_line("b", "y", temperature=5)], "line 2: body: invalid value for 'temperature'"),
    ([chat_line("a", "x"), chat_line("b", "y", best_of=2)], "line 2: body: parameter 'best_of' is not supported"),
    ([chat_line("a", "x"), chat_line("b", "y", stream=True)], "line 2: body: stream is not allowed"),
    ([chat_line("a", "x"), {**chat_line("b", "y"), "extra": 1}], "line 2: unknown field 'extra'"),
    ([chat_line("a", "x") | {"custom_id": 7}], "line 1: custom_id must be a string"),
]


@pytest.mark.parametrize(("rows", "phrase"), BAD_FILES)
async def test_bad_input_files_are_refused_naming_the_line(gw, rows, phrase):
    response = await upload(gw, gw.admin, jsonl(rows))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_batch_file" and phrase in error["message"], error
    assert (await gw.client.get("/v1/files", headers=gw.admin)).json()["data"] == []


async def test_unparsable_and_oversized_files_name_the_line(tmp_path, base):
    async with full_gateway(tmp_path / "s", model=base, batch_max_lines=2, max_body_bytes=1024) as gw:
        good = json.dumps(chat_line("a", "x")).encode()
        for raw, phrase in (
            (good + b"\nnot json\n", "line 2: not valid JSON"),
            (b"\n\n", "empty"),
            (good + b"\n" + b"\xff\xfe\n", "line 2: not UTF-8"),
            (jsonl([chat_line(str(i), "x") for i in range(3)]), "line 3: a batch file may have at most 2 lines"),
            (good + b"\n" + json.dumps(chat_line("b", "x" * 2000)).encode() + b"\n", "line 2: longer than 1024"),
        ):
            response = await upload(gw, gw.admin, raw)
            assert response.status_code == 400 and phrase in response.json()["error"]["message"], response.text


async def test_another_tenants_batches_answer_404(gw):
    acme, other = await tenant_key(gw, "acme"), await tenant_key(gw, "other")
    batch = await start_batch(gw, acme, [chat_line("a", "x")])
    for method, path in (("GET", ""), ("POST", "/cancel")):
        theirs = await gw.client.request(method, f"/v1/batches/{batch['id']}{path}", headers=other)
        missing = await gw.client.request(method, f"/v1/batches/batch_nope{path}", headers=other)
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"]["code"] == "batch_not_found"
    assert (await gw.client.get("/v1/batches", headers=other)).json()["data"] == []
    assert [b["id"] for b in (await gw.client.get("/v1/batches", headers=acme)).json()["data"]] == [batch["id"]]
    body = {"input_file_id": batch["input_file_id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    borrowed = await gw.client.post("/v1/batches", json=body, headers=other)
    assert borrowed.status_code == 404 and borrowed.json()["error"]["code"] == "file_not_found"
    done = await wait_for(gw, batch["id"], acme, finished)
    assert (await gw.client.get(f"/v1/files/{done['output_file_id']}", headers=other)).status_code == 404


async def test_list_pages_newest_first(gw):
    ids = [(await start_batch(gw, gw.admin, [chat_line("a", "x")]))["id"] for _ in range(3)]
    first = (await gw.client.get("/v1/batches?limit=2", headers=gw.admin)).json()
    assert [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    assert first["first_id"] == ids[2] and first["last_id"] == ids[1]
    rest = (await gw.client.get(f"/v1/batches?limit=2&after={first['last_id']}", headers=gw.admin)).json()
    assert [b["id"] for b in rest["data"]] == [ids[0]] and rest["has_more"] is False


async def test_limits_on_queued_batches_and_lines(gw):
    acme = await tenant_key(gw, "acme", max_queued_batches=1, max_batch_lines=3)
    gw.engine.release = asyncio.Event()  # nothing finishes
    await start_batch(gw, acme, [chat_line("a", "x")])
    uploaded = (await upload(gw, acme, jsonl([chat_line("b", "x")]))).json()
    body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    second = await gw.client.post("/v1/batches", json=body, headers=acme)
    assert second.status_code == 429 and "max_queued_batches" in second.json()["error"]["message"]
    await gw.client.patch("/v1/tenants/acme", json={"limits": {"max_queued_batches": 5}}, headers=gw.admin)
    big = (await upload(gw, acme, jsonl([chat_line(str(i), "x") for i in range(3)]))).json()
    over = await gw.client.post("/v1/batches", json=body | {"input_file_id": big["id"]}, headers=acme)
    assert over.status_code == 429 and "max_batch_lines" in over.json()["error"]["message"]
    assert (await gw.client.post("/v1/batches", json=body, headers=acme)).status_code == 200
    gw.engine.release.set()


async def test_cancel_stops_within_seconds_and_keeps_what_was_done(tmp_path, base):
    engine = GatedEngine(free=2, cache_size=3)
    async with full_gateway(tmp_path / "s", engine, model=base, batch_lines_per_batch=1) as gw:
        batch = await start_batch(gw, gw.admin, [chat_line(f"q{i}", f"q {i}") for i in range(6)])
        running = await wait_for(gw, batch["id"], gw.admin, lambda b: b["request_counts"]["completed"] == 2)
        assert running["status"] == "in_progress", running
        started = time.monotonic()
        cancelled = (await gw.client.post(f"/v1/batches/{batch['id']}/cancel", headers=gw.admin)).json()
        assert time.monotonic() - started < 5
        assert cancelled["status"] == "cancelled" and cancelled["cancelling_at"] and cancelled["cancelled_at"]
        assert cancelled["request_counts"] == {"total": 6, "completed": 2, "failed": 0}
        kept = await content(gw, gw.admin, cancelled["output_file_id"])
        assert [line["custom_id"] for line in kept] == ["q0", "q1"]
        assert engine.running == 0  # the line in flight was stopped
        again = await gw.client.post(f"/v1/batches/{batch['id']}/cancel", headers=gw.admin)
        assert again.json()["status"] == "cancelled"


async def test_a_batch_not_started_is_cancelled_at_once(tmp_path, base):
    async with full_gateway(tmp_path / "s", model=base, batch_max_running=0) as gw:
        batch = await start_batch(gw, gw.admin, [chat_line("a", "x")])
        cancelled = (await gw.client.post(f"/v1/batches/{batch['id']}/cancel", headers=gw.admin)).json()
        assert cancelled["status"] == "cancelled" and cancelled["in_progress_at"] is None
        assert cancelled["output_file_id"] is None


async def test_a_batch_survives_a_restart_and_runs_only_the_lines_left(tmp_path, base):
    state = tmp_path / "state"
    rows = [chat_line(f"q{i}", f"q {i}") for i in range(8)]
    first = GatedEngine(free=3, cache_size=3)
    async with full_gateway(state, first, model=base, batch_lines_per_batch=1) as gw:
        batch = await start_batch(gw, gw.admin, rows)
        await wait_for(gw, batch["id"], gw.admin, lambda b: b["request_counts"]["completed"] == 3)
    second = FakeEngine(cache_size=3)
    async with full_gateway(state, second, model=base) as gw:
        done = await wait_for(gw, batch["id"], gw.admin, finished)
        assert done["status"] == "completed" and done["request_counts"] == {"total": 8, "completed": 8, "failed": 0}
        assert len(second.generated) == 5  # the three done before the restart were kept, not run again
        outputs = await content(gw, gw.admin, done["output_file_id"])
        assert [line["custom_id"] for line in outputs] == [f"q{i}" for i in range(8)]


async def test_an_expired_batch_ends_expired_with_what_was_done(tmp_path, base):
    engine = GatedEngine(free=2, cache_size=3)
    async with full_gateway(tmp_path / "s", engine, model=base, batch_lines_per_batch=1) as gw:
        batch = await start_batch(gw, gw.admin, [chat_line(f"q{i}", "x") for i in range(5)])
        await wait_for(gw, batch["id"], gw.admin, lambda b: b["request_counts"]["completed"] == 2)
        with gw.registry.catalog.raw_engine.begin() as conn:
            conn.exec_driver_sql("UPDATE batches SET expires_at = ? WHERE id = ?", (time.time() - 1, batch["id"]))
        done = await wait_for(gw, batch["id"], gw.admin, finished)
        assert done["status"] == "expired" and done["expired_at"], done
        assert [line["custom_id"] for line in await content(gw, gw.admin, done["output_file_id"])] == ["q0", "q1"]
        expired = await content(gw, gw.admin, done["error_file_id"])
        assert [line["custom_id"] for line in expired] == ["q2", "q3", "q4"]
        assert {line["error"]["code"] for line in expired} == {"batch_expired"}


async def test_batch_lines_wait_while_interactive_requests_run(gw):
    gw.engine.release = asyncio.Event()
    interactive = asyncio.create_task(
        gw.client.post("/v1/chat/completions", json=chat_line("i", "now")["body"], headers=gw.admin)
    )
    while not gw.engine.running:
        await asyncio.sleep(0.01)
    batch = await start_batch(gw, gw.admin, [chat_line("a", "later")])
    await asyncio.sleep(1.5)  # the runner claimed it, and waits
    assert len(gw.engine.generated) == 1
    running = (await gw.client.get(f"/v1/batches/{batch['id']}", headers=gw.admin)).json()
    assert running["status"] == "in_progress"
    gw.engine.release.set()
    assert (await interactive).status_code == 200
    assert (await wait_for(gw, batch["id"], gw.admin, finished))["status"] == "completed"


async def test_deleting_a_tenant_deletes_its_batches_and_their_files(gw):
    acme = await tenant_key(gw, "acme")
    batch = await start_batch(gw, acme, [chat_line("a", "x")])
    done = await wait_for(gw, batch["id"], acme, finished)
    assert (await gw.client.delete("/v1/tenants/acme", headers=gw.admin)).status_code == 200
    assert (await gw.client.get(f"/v1/batches/{batch['id']}", headers=gw.admin)).status_code == 404
    for file_id in (done["input_file_id"], done["output_file_id"]):
        assert (await gw.client.get(f"/v1/files/{file_id}", headers=gw.admin)).status_code == 404


def test_one_runner_claims_a_batch_and_another_takes_it_over_once_stale(tmp_path):
    from adapters.batches_db import BatchRow
    from adapters.database import BaseIdentity, Database

    catalog = Database(tmp_path / "catalog.sqlite3", BaseIdentity("base", "fp"))
    records = BatchRecords(catalog)
    now = time.time()
    row = BatchRow("batch_1", "", "/v1/completions", "file-1", "24h", "validating", 2, now, now + 60)
    records.add(row, 10, 10)
    claimed = records.claim("gateway-a", now - 30, set())
    assert claimed is not None and (claimed.status, claimed.runner) == ("in_progress", "gateway-a")
    assert records.claim("gateway-b", now - 30, set()) is None  # its heartbeat is fresh
    assert records.claim("gateway-a", now - 30, {"batch_1"}) is None  # already running there
    taken = records.claim("gateway-b", time.time() + 1, set())  # as if gateway-a's beat had stopped
    assert taken is not None and taken.runner == "gateway-b"
    assert records.heartbeat("batch_1", "gateway-a") is None  # gateway-a learns it is not its own
    catalog.close()


async def test_batch_lines_reach_the_engine_at_its_lowest_priority(gw):
    from server.openai.fairness import BACKGROUND_PRIORITY

    acme = await tenant_key(gw, "acme")
    batch = await start_batch(gw, acme, [chat_line("a", "later")])
    assert (await wait_for(gw, batch["id"], acme, finished))["status"] == "completed"
    direct = await gw.client.post("/v1/chat/completions", json=chat_line("i", "now")["body"], headers=acme)
    assert direct.status_code == 200
    (line, interactive) = [options.priority for _, _, options, _ in gw.engine.generated]
    assert line >= BACKGROUND_PRIORITY > interactive >= 0
    # The line's tokens were acme's service: its counter counts them (and its prompt).
    assert gw.app.state.generator.fair_queue.counters["acme"] > 2 * 3 * 2

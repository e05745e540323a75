"""What the deletion and store-collection tests build on: a tenant with files, jobs, adapters and
merges; a runner that trains nothing; a store backend that can be taken down; looks into the catalog.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from adapters.blobs import UNREACHABLE
from adapters.database import Database, adapters_table, keys_table, tenants_table
from adapters.errors import StoreUnavailable
from adapters.fine_tuning_db import checkpoints_table, events_table, files_table, jobs_table
from tests.adapter_files import TINY_CONFIG

CHAT = [
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A tuned model."}]}
] * 4
TRAINING_DATA = "".join(json.dumps(row) + "\n" for row in CHAT).encode()


def tiny_base(folder: Path) -> Path:
    """A base model folder as far as fine-tuning's routes read it (its config), without the demo's build."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


def shared_urls_for(kind: str, request, tmp_path: Path) -> tuple[str, str]:
    """A catalog URL and a store URL that several gateways share: SQLite and a folder, or PostgreSQL and S3."""
    if kind == "sqlite+folder":
        (tmp_path / "shared" / "store").mkdir(parents=True)
        return f"sqlite:///{tmp_path / 'shared' / 'catalog.sqlite3'}", f"file://{tmp_path / 'shared' / 'store'}"
    return request.getfixturevalue("postgres_url"), request.getfixturevalue("s3_env").url


class FakeRunner:
    """Trains nothing: a metrics event and a checkpoint, then waits for `finish` (unless `hold` is off).

    A stop ends the job as cancelled, as the real worker does, except for the jobs in `stubborn`:
    those wait for `finish` and succeed, stopped or not, as a job that ended just as it was stopped.
    """

    def __init__(self, adapter: Path, *, hold: bool = True):
        self.adapter = adapter
        self.hold = hold
        self.finish = asyncio.Event()
        self.stubborn: set[str] = set()
        self.started: list[str] = []
        self._stops: dict[str, asyncio.Event] = {}

    @property
    def stopped(self) -> list[str]:
        """The jobs the scheduler has asked to stop."""
        return [job_id for job_id, stop in self._stops.items() if stop.is_set()]

    async def run(self, spec: dict[str, Any], job_dir: Path, stop: asyncio.Event):
        job_id = job_dir.name
        out = Path(spec["out_dir"])
        checkpoint = out / "checkpoint-1"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_config.json").write_text("{}")
        yield {"type": "metrics", "step": 1, "total_steps": 2, "epoch": 1, "train_loss": 0.5}
        yield {"type": "checkpoint", "step": 1, "epoch": 1, "train_loss": 0.5, "folder": checkpoint}
        self._stops[job_id] = stop
        self.started.append(job_id)
        if job_id in self.stubborn:
            await self.finish.wait()
        elif self.hold:
            waits = [asyncio.create_task(self.finish.wait()), asyncio.create_task(stop.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            if stop.is_set():
                yield {"type": "cancelled"}
                return
        final = out / "adapter"
        shutil.copytree(self.adapter, final)
        yield {"type": "succeeded", "folder": final, "trained_tokens": 12}


def install_runner(gw, runner: FakeRunner) -> FakeRunner:
    gw.app.state.fine_tuning.scheduler.runner = runner
    return runner


class FlakyBlobs:
    """A store backend that can be taken down: while `down`, every call fails as an unreachable store's does."""

    def __init__(self, inner):
        self.inner = inner
        self.down = False

    def __getattr__(self, name: str):
        attribute = getattr(self.inner, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            if self.down:
                raise StoreUnavailable(UNREACHABLE)
            return attribute(*args, **kwargs)

        return call


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 5.0) -> None:
    """Wait until `check()` is true; fail past `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s")
        await asyncio.sleep(0.05)


async def new_tenant(gw, name: str) -> dict[str, str]:
    response = await gw.client.post("/v1/tenants", json={"name": name}, headers=gw.admin)
    assert response.status_code == 201, response.text
    return gw.as_(response.json()["api_key"])


async def upload_adapter(gw, headers, name: str, folder: Path) -> str:
    """Register an adapter by upload; returns its content hash, which names its folder and object."""
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    response = await gw.client.post("/v1/adapters", data={"name": name}, files=files, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["content_hash"].removeprefix("sha256:")


async def upload_file(gw, headers) -> str:
    response = await gw.client.post(
        "/v1/files", files={"file": ("train.jsonl", TRAINING_DATA)}, data={"purpose": "fine-tune"}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def create_job(gw, headers, file_id: str) -> str:
    response = await gw.client.post(
        "/v1/fine_tuning/jobs", json={"model": "base", "training_file": file_id}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def job_status(gw, headers, job_id: str) -> str:
    return (await gw.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=headers)).json().get("status", "")


def rows_of(catalog: Database, owner: str, job_ids: list[str]) -> dict[str, int]:
    """How many rows of each table belong to `owner` (events and checkpoints: to `job_ids`)."""
    counts = {
        "tenants": sa.select(sa.func.count()).where(tenants_table.c.name == owner),
        "api_keys": sa.select(sa.func.count()).where(keys_table.c.tenant == owner),
        "adapters": sa.select(sa.func.count()).where(adapters_table.c.owner == owner),
        "files": sa.select(sa.func.count()).where(files_table.c.owner == owner),
        "jobs": sa.select(sa.func.count()).where(jobs_table.c.owner == owner),
        "events": sa.select(sa.func.count()).where(events_table.c.job_id.in_(job_ids)),
        "checkpoints": sa.select(sa.func.count()).where(checkpoints_table.c.job_id.in_(job_ids)),
    }
    with catalog.raw_engine.connect() as conn:
        return {table: conn.execute(statement).scalar_one() for table, statement in counts.items()}


def checkpoint_keys(catalog: Database, job_ids: list[str]) -> list[str]:
    statement = sa.select(checkpoints_table.c.blob_key).where(checkpoints_table.c.job_id.in_(job_ids))
    with catalog.raw_engine.connect() as conn:
        return list(conn.execute(statement).scalars())


async def sees_nothing(gw, headers, file_ids: list[str], job_ids: list[str], model_names: list[str]) -> None:
    """What a new tenant must see of an earlier one of its name: nothing at all."""
    assert (await gw.client.get("/v1/files", headers=headers)).json()["data"] == []
    for file_id in file_ids:
        for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content"):
            answer = await gw.client.get(path, headers=headers)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "file_not_found", answer.text
    assert (await gw.client.get("/v1/fine_tuning/jobs", headers=headers)).json()["data"] == []
    for job_id in job_ids:
        for path in ("", "/events", "/checkpoints"):
            answer = await gw.client.get(f"/v1/fine_tuning/jobs/{job_id}{path}", headers=headers)
            assert answer.status_code == 404, answer.text
    models = {m["id"] for m in (await gw.client.get("/v1/models", headers=headers)).json()["data"]}
    assert models == {"base"}
    for name in model_names:
        body = {"model": name, "prompt": "x", "max_tokens": 1}
        assert (await gw.client.post("/v1/completions", json=body, headers=headers)).status_code == 404
    assert (await gw.client.get("/v1/usage", headers=headers)).json()["data"] == []

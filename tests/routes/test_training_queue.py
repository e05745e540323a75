"""The training queue takes tenants in turn (round robin), not in order of arrival, and its
scheduler stops at shutdown."""

from __future__ import annotations

import asyncio

import pytest

from adapters.fine_tuning_db import FineTuningRecords
from tests.conftest import full_gateway
from tests.routes.test_fine_tuning import CHAT, create_job, jsonl, upload, wait_status


async def test_queued_jobs_are_claimed_round_robin_across_tenants(tmp_path, demo):
    async with full_gateway(tmp_path / "state", model=str(demo.base), max_training_jobs=0) as gw:
        headers = {}
        for name in ("greedy", "modest", "third"):
            card = await gw.client.post(
                "/v1/tenants", json={"name": name, "limits": {"max_queued_jobs": 8}}, headers=gw.admin
            )
            assert card.status_code == 201, card.text
            headers[name] = gw.as_(card.json()["api_key"])
        owner_of: dict[str, str] = {}

        async def queue_jobs(name: str, count: int) -> None:
            file_id = (await upload(gw, headers[name], jsonl(CHAT))).json()["id"]
            for _ in range(count):
                job = (await create_job(gw, headers[name], file_id)).json()
                owner_of[job["id"]] = name
                assert (await wait_status(gw, job["id"], headers[name], {"queued"}))["status"] == "queued"

        await queue_jobs("greedy", 4)  # first in, all of them
        await queue_jobs("modest", 2)
        await queue_jobs("third", 1)
        records = FineTuningRecords(gw.registry.catalog)
        claimed = []
        while (job := records.claim_next("runner-under-test")) is not None:
            claimed.append(owner_of[job.id])
        # First come, first served would run greedy's four first.
        assert claimed == ["greedy", "modest", "third", "greedy", "modest", "greedy", "greedy"]


@pytest.mark.parametrize("turns", range(4))
async def test_shutdown_stops_the_scheduler_that_a_new_job_just_woke(tmp_path, demo, turns):
    """A job created just before shutdown wakes the scheduler; the cancel that close() sends may
    meet that wake a few loop turns later. Python 3.11's wait_for swallowed it there, and the
    scheduler's loop then outlived the gateway's shutdown (a test's teardown hung for good)."""
    async with full_gateway(tmp_path / "state", model=str(demo.base), max_training_jobs=0) as gw:
        fine_tuning = gw.app.state.fine_tuning
        await asyncio.sleep(0.2)  # the scheduler waits for its next poll
        fine_tuning.scheduler.wake()
        for _ in range(turns):
            await asyncio.sleep(0)
        await asyncio.wait_for(fine_tuning.close(), 10)
        assert fine_tuning.task.done()

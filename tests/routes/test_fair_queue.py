"""The fair queue inside the app (over a FakeEngine): no request is left hanging in it."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import full_gateway

BODY = {"model": "base", "prompt": "hello", "max_tokens": 4}


async def scheduling(gw) -> dict:
    return (await gw.client.get("/v1/scheduling", headers=gw.admin)).json()


async def wait_until(check, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_client_that_leaves_while_queued_gives_its_place_and_its_limits_back(tmp_path):
    async with full_gateway(tmp_path / "state", max_num_seqs=2, fair_queue_depth=2) as gw:
        card = await gw.client.post(
            "/v1/tenants", json={"name": "acme", "limits": {"max_concurrent": 3}}, headers=gw.admin
        )
        acme = gw.as_(card.json()["api_key"])
        gw.engine.release = asyncio.Event()  # the engine holds every generation
        running = [asyncio.create_task(gw.client.post("/v1/completions", json=BODY, headers=acme)) for _ in range(2)]
        await wait_until(lambda: _equals(gw, "in_flight", 2))
        queued = asyncio.create_task(gw.client.post("/v1/completions", json=BODY, headers=acme))
        await wait_until(lambda: _equals(gw, "waiting", 1))
        assert gw.engine.running == 2  # the third never reached the engine
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        await wait_until(lambda: _equals(gw, "waiting", 0))
        # Its unit of the tenant's concurrency came back: a third request is admitted, not a 429.
        third = asyncio.create_task(gw.client.post("/v1/completions", json=BODY, headers=acme))
        await wait_until(lambda: _equals(gw, "waiting", 1))
        gw.engine.release.set()
        answers = await asyncio.gather(*running, third)
        assert [answer.status_code for answer in answers] == [200, 200, 200]
        state = await scheduling(gw)
        assert (state["in_flight"], state["waiting"]) == (0, 0)
        assert [t["tenant"] for t in state["tenants"]] == ["acme"]


async def test_requests_waiting_or_running_when_the_engine_dies_get_a_503_at_once(tmp_path):
    async with full_gateway(tmp_path / "state", max_num_seqs=1, fair_queue_depth=1) as gw:
        gw.engine.release = asyncio.Event()
        running = asyncio.create_task(gw.client.post("/v1/completions", json=BODY, headers=gw.admin))
        await wait_until(lambda: _equals(gw, "in_flight", 1))
        queued = [asyncio.create_task(gw.client.post("/v1/completions", json=BODY, headers=gw.admin)) for _ in range(3)]
        await wait_until(lambda: _equals(gw, "waiting", 3))
        gw.engine.healthy = False  # the engine is gone; its running request is held until it is failed
        answers = await asyncio.wait_for(asyncio.gather(*queued, running), 5)
        assert [answer.status_code for answer in answers] == [503] * 4
        assert "inference engine has stopped" in answers[0].json()["error"]["message"]
        assert answers[-1].json()["error"]["code"] == "engine_unavailable"


async def _equals(gw, field: str, value: int) -> bool:
    return (await scheduling(gw))[field] == value

"""One request cannot fan out into more sequences than --max-sequences-per-request, and each of its
sequences counts against its tenant's concurrency and --max-in-flight."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import full_gateway
from tests.security.hostile import chat, completion, hostile_world

HELD = 0.05  # long enough for a held request to be admitted and reach the engine


async def test_twenty_thousand_prompts_times_n_16_is_refused_before_any_work(tmp_path):
    async with hostile_world(tmp_path, limits={"max_concurrent": 1}) as gw:
        body = {"model": "mine", "prompt": ["a"] * 20000, "n": 16, "max_tokens": 1}
        started = time.perf_counter()
        response = await gw.client.post("/v1/completions", json=body, headers=gw.tenant)
        seconds = time.perf_counter() - started
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["code"] == "too_many_sequences" and error["param"] == "n"
        message = error["message"]
        assert "320000 sequences" in message and "--max-sequences-per-request" in message and "64" in message
        assert gw.engine.generated == [] and gw.engine.tokenized == []
        assert len(response.content) < 1000 and seconds < 2.0
        assert gw.app.state.tenants.in_flight("t") == 0 and gw.app.state.generator.in_flight == 0


async def test_the_cap_is_a_setting_and_covers_chat(tmp_path):
    async with hostile_world(tmp_path, max_sequences_per_request=4) as gw:
        refused = await gw.client.post("/v1/chat/completions", json=chat(n=5), headers=gw.tenant)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "too_many_sequences"
        two_by_two = completion(prompt=["a", "b"], n=2)
        assert (await gw.client.post("/v1/completions", json=two_by_two, headers=gw.tenant)).status_code == 200
        assert len(gw.engine.generated) == 2


async def test_each_sequence_takes_one_unit_of_the_tenants_concurrency(tmp_path):
    async with hostile_world(tmp_path, limits={"max_concurrent": 16}) as gw:
        gw.engine.release = asyncio.Event()
        sixteen = completion(prompt=["a", "b"], n=8)
        first = asyncio.create_task(gw.client.post("/v1/completions", json=sixteen, headers=gw.tenant))
        await asyncio.sleep(HELD)
        assert gw.app.state.tenants.in_flight("t") == 16
        second = await asyncio.wait_for(gw.client.post("/v1/completions", json=completion(), headers=gw.tenant), 2)
        assert second.status_code == 429, second.text
        assert "at once" in second.json()["error"]["message"] and second.headers["retry-after"] == "1"
        gw.engine.release.set()
        done = await first
        assert done.status_code == 200 and len(done.json()["choices"]) == 16
        assert gw.app.state.tenants.in_flight("t") == 0 and gw.app.state.generator.in_flight == 0


async def test_a_request_that_can_never_fit_its_tenant_is_400_not_a_wait(tmp_path):
    async with hostile_world(tmp_path, limits={"max_concurrent": 4}) as gw:
        gw.engine.release = asyncio.Event()  # a request let in would wait here: the test would time out
        response = await asyncio.wait_for(gw.client.post("/v1/completions", json=completion(n=8), headers=gw.tenant), 2)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "too_many_sequences" and error["param"] == "n"
        assert "8 sequences" in error["message"] and "at most 4" in error["message"]
        assert gw.engine.generated == [] and gw.app.state.tenants.in_flight("t") == 0


async def test_sequences_count_against_max_in_flight(tmp_path):
    async with full_gateway(tmp_path / "state", max_in_flight=8) as gw:
        gw.engine.release = asyncio.Event()
        six = asyncio.create_task(gw.client.post("/v1/completions", json=completion("base", n=6), headers=gw.admin))
        await asyncio.sleep(HELD)
        assert gw.app.state.generator.in_flight == 6
        three = await asyncio.wait_for(
            gw.client.post("/v1/completions", json=completion("base", n=3), headers=gw.admin), 2
        )
        assert three.status_code == 503 and three.json()["error"]["code"] == "overloaded"
        assert three.headers["retry-after"] == "1"
        never = await gw.client.post("/v1/completions", json=completion("base", n=9), headers=gw.admin)
        assert never.status_code == 400 and "--max-in-flight" in never.json()["error"]["message"]
        gw.engine.release.set()
        assert (await six).status_code == 200
        assert gw.app.state.generator.in_flight == 0
        two = await gw.client.post("/v1/completions", json=completion("base", n=2), headers=gw.admin)
        assert two.status_code == 200


async def test_a_client_that_leaves_gives_its_sequences_back(tmp_path):
    import json

    async with hostile_world(tmp_path, limits={"max_concurrent": 4}) as gw:
        gw.engine.release = asyncio.Event()  # the engine never answers: only the client's leaving ends it
        body = json.dumps(completion(prompt=["a", "b"], n=2)).encode()
        sent: list[dict] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.sleep(HELD)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [(b"content-type", b"application/json")] + [
            (name.lower().encode(), value.encode()) for name, value in gw.tenant.items()
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"localhost"), *headers],
            "client": ("127.0.0.1", 1),
            "server": ("localhost", 80),
        }
        await asyncio.wait_for(gw.app(scope, receive, send), 5)
        assert gw.app.state.tenants.in_flight("t") == 0 and gw.app.state.generator.in_flight == 0
        gw.engine.release.set()
        after = await gw.client.post("/v1/completions", json=completion(prompt=["a", "b"], n=2), headers=gw.tenant)
        assert after.status_code == 200, after.text

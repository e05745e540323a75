from __future__ import annotations

import asyncio

from tests.conftest import full_gateway


async def test_requests_beyond_the_in_flight_bound_get_503_with_retry_after(tmp_path):
    async with full_gateway(tmp_path / "state", max_in_flight=2) as gw:
        gw.engine.release = asyncio.Event()
        payload = {"model": "base", "prompt": "x", "max_tokens": 1}
        running = [
            asyncio.create_task(gw.client.post("/v1/completions", json=payload, headers=gw.admin)) for _ in range(2)
        ]
        await asyncio.sleep(0.05)
        refused = await gw.client.post("/v1/completions", json=payload, headers=gw.admin)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        gw.engine.release.set()
        assert [r.status_code for r in await asyncio.gather(*running)] == [200, 200]
        assert (await gw.client.post("/v1/completions", json=payload, headers=gw.admin)).status_code == 200
        assert gw.app.state.generator.in_flight == 0


async def test_huge_bodies_are_413_before_they_are_read(tmp_path):
    async with full_gateway(tmp_path / "state", max_body_bytes=4096) as gw:
        big = {"model": "base", "prompt": "x" * 10_000}
        response = await gw.client.post("/v1/completions", json=big, headers=gw.admin)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

        async def chunked():
            for _ in range(10):
                yield b" " * 1024

        streamed = await gw.client.post(
            "/v1/completions", content=chunked(), headers=gw.admin | {"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        assert gw.engine.generated == []


async def test_odd_unicode_and_vllm_extensions(tmp_path):
    async with full_gateway(tmp_path / "state") as gw:
        for prompt in ["\u0000nul", "\ud7ff\ue000", "👩‍👩‍👧 ｆｕｌｌ", "\u202eright-to-left"]:
            response = await gw.client.post(
                "/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 1}, headers=gw.admin
            )
            assert response.status_code == 200, prompt
        await gw.client.post(
            "/v1/completions",
            json={"model": "base", "prompt": "x", "max_tokens": 3, "min_tokens": 2, "ignore_eos": True},
            headers=gw.admin,
        )
        options = gw.engine.generated[-1][2]
        assert (options.min_tokens, options.ignore_eos) == (2, True)
        lone_surrogate = b'{"model": "base", "prompt": "\\udc00", "max_tokens": 1}'
        response = await gw.client.post(
            "/v1/completions", content=lone_surrogate, headers=gw.admin | {"content-type": "application/json"}
        )
        assert response.status_code in (200, 400)


async def test_engine_death_turns_ready_off_and_calls_for_an_exit(tmp_path, monkeypatch):
    monkeypatch.setattr("server.app.ENGINE_CHECK_SECONDS", 0.01)
    async with full_gateway(tmp_path / "state") as gw:
        called = asyncio.Event()
        gw.app.state.on_engine_death = called.set
        assert (await gw.client.get("/ready")).status_code == 200
        gw.engine.healthy = False
        await asyncio.wait_for(called.wait(), timeout=2)
        assert (await gw.client.get("/ready")).status_code == 503
        dead = await gw.client.post("/v1/completions", json={"model": "base", "prompt": "x"}, headers=gw.admin)
        assert dead.status_code == 503 and dead.json()["error"]["code"] == "engine_unavailable"

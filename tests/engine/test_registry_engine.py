"""The registry on the real engine: refusals keep it alive, eviction and churn keep outputs exact."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest

from adapters.base_model import BaseModelInfo
from adapters.demo import BASE_ANSWER, DEMO_PROMPT
from tests.adapter_files import bad_adapters
from tests.engine.conftest import ADMIN_KEY

pytestmark = pytest.mark.engine


async def ask(client: httpx.AsyncClient, model: str) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": DEMO_PROMPT}],
            "max_tokens": 24,
            "temperature": 0,
        },
    )


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture
async def client(gateway):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=120) as http:
        yield http


async def register(client, name, path):
    return await client.post("/v1/adapters", json={"name": name, "path": str(path)})


async def test_bad_adapters_are_refused_and_the_engine_keeps_serving(gateway, client, demo, tmp_path):
    base = BaseModelInfo.from_model_dir(demo.base)
    corpus = bad_adapters(tmp_path, base, max_rank=64)
    for case, (folder, phrase) in corpus.items():
        response = await register(client, f"bad-{case}", folder)
        assert 400 <= response.status_code < 500, (case, response.text)
        assert phrase in response.json()["error"]["message"], case
        assert str(tmp_path) not in response.text
        # and a request naming it is a plain 404, never a generate with a broken path
        assert (await ask(client, f"bad-{case}")).status_code == 404
    assert (await client.get("/ready")).status_code == 200
    assert answer(await ask(client, "pirate")) == demo.answers["pirate"]
    assert answer(await ask(client, gateway.base_name)) == BASE_ANSWER
    names = {a["name"] for a in (await client.get("/v1/adapters")).json()["data"]}
    assert not any(name.startswith("bad-") for name in names)


async def test_eviction_under_concurrent_traffic_keeps_every_output_exact(gateway, client, demo):
    # 12 adapters, --max-cpu-loras 8: most requests need a load or an eviction.
    sources = {f"copy{i}": ("pirate", "poet")[i % 2] for i in range(10)}
    for name, source in sources.items():
        assert (await register(client, name, demo.adapters[source])).status_code == 201
    expected = {name: demo.answers[source] for name, source in sources.items()}
    expected |= {"pirate": demo.answers["pirate"], "poet": demo.answers["poet"], gateway.base_name: BASE_ANSWER}
    try:
        order = [name for _, name in zip(range(48), itertools.cycle(sorted(expected)))]
        replies = await asyncio.gather(*(ask(client, name) for name in order))
        wrong = [
            (name, answer(reply)) for name, reply in zip(order, replies, strict=True) if answer(reply) != expected[name]
        ]
        assert wrong == []
        loaded = [a for a in (await client.get("/v1/adapters")).json()["data"] if a["state"] == "loaded"]
        assert len(loaded) <= 8
        # The engine's worker reloaded adapters from the store inside its steps, and no answer changed.
        scrape = (await client.get("/metrics")).text.splitlines()
        assert sum(float(line.split()[-1]) for line in scrape if line.startswith("lora_gateway_adapter_reloads_total"))
        assert all(a["in_flight"] == 0 for a in (await client.get("/v1/adapters")).json()["data"])
    finally:
        for name in sources:
            await client.delete(f"/v1/adapters/{name}")


async def test_register_replace_delete_while_requests_run(gateway, client, demo):
    stable = {"pirate": demo.answers["pirate"], "poet": demo.answers["poet"], gateway.base_name: BASE_ANSWER}
    churn_answers = {demo.answers["pirate"], demo.answers["poet"]}

    async def traffic():
        failures = []
        for round_ in range(6):
            names = [*stable, "churn"]
            replies = await asyncio.gather(*(ask(client, name) for name in names))
            for name, reply in zip(names, replies, strict=True):
                if name == "churn":
                    if reply.status_code == 404:
                        continue  # not yet registered, or deleted: the only allowed failure
                    if answer(reply) not in churn_answers:
                        failures.append((round_, name, reply.text))
                elif reply.status_code != 200 or answer(reply) != stable[name]:
                    failures.append((round_, name, reply.text))
        return failures

    async def admin():
        assert (await register(client, "churn", demo.adapters["pirate"])).status_code == 201
        await client.post("/v1/adapters/churn/pin")
        assert (await register(client, "churn", demo.adapters["poet"])).status_code == 201
        await client.post("/v1/adapters/churn/unpin")
        assert answer(await ask(client, "churn")) == demo.answers["poet"]
        assert (await client.delete("/v1/adapters/churn")).status_code == 200

    failures, _ = await asyncio.gather(traffic(), admin())
    assert failures == []
    assert (await ask(client, "churn")).status_code == 404

"""The gateway on Ray Serve with two engine replicas: parity with PEFT, adapter affinity, the
cluster view, a replica killed as it starts, an engine that dies mid-stream, and a client that
leaves mid-stream."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest

from adapters.demo import DEMO_PROMPT
from tests.engine.conftest import ADMIN_KEY
from tests.engine.reference import PeftReference
from tests.ray.conftest import engine_processes

pytestmark = [pytest.mark.engine, pytest.mark.ray, pytest.mark.timeout(300)]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_TOKENS = 20
# Sequential requests for each adapter once it is resident: 11 of 12 on one replica by chance, with
# routing blind to the adapter, has odds of 0.6 %.
AFFINE_ROUNDS = 12
ROUTER_HEARS_SECONDS = 3


@pytest.fixture(scope="module")
def reference(demo) -> PeftReference:
    return PeftReference(demo.base, demo.adapters)


@pytest.fixture
async def client(ray_gateway):
    async with httpx.AsyncClient(base_url=ray_gateway.url, headers=ADMIN, timeout=120) as http:
        yield http


async def chat(client, model: str, prompt: str = DEMO_PROMPT, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
    return await client.post("/v1/chat/completions", json=body | {"temperature": 0} | extra)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def peft(reference: PeftReference, adapter: str | None, prompt: str = DEMO_PROMPT) -> str:
    return reference.chat(adapter, (("user", prompt),), MAX_TOKENS)


async def cluster(client) -> list[dict]:
    response = await client.get("/v1/cluster")
    assert response.status_code == 200, response.text
    return response.json()["data"]


async def until(check, seconds: float, step: float = 0.5):
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {seconds} s")
        await asyncio.sleep(step)


async def test_mixed_traffic_through_the_replicas_matches_peft(client, reference):
    prompts = [DEMO_PROMPT, "Tell me about the sea."]
    cases = [(model, prompt) for model in ("demo", "pirate", "poet") for prompt in prompts] * 3
    responses = await asyncio.gather(*(chat(client, model, prompt) for model, prompt in cases))
    for (model, prompt), response in zip(cases, responses, strict=True):
        expected = peft(reference, None if model == "demo" else model, prompt)
        assert text(response) == expected, (model, prompt)
        assert response.headers["x-lora-gateway-replica"]


async def test_echo_prompt_logprobs_and_logit_bias_cross_the_replicas(client, reference):
    prompt = "Once upon a time"
    body = {"model": "pirate", "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 2, "temperature": 0}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    values = response.json()["choices"][0]["logprobs"]["token_logprobs"]
    ids = reference.tokenizer.encode(prompt)
    expected = reference.prompt_logprobs("pirate", ids)
    assert values[0] is None
    assert all(abs(values[i] - expected[i - 1, ids[i]].item()) < 1e-4 for i in range(1, len(ids))), values
    forced = {"model": "pirate", "prompt": prompt, "max_tokens": 3, "temperature": 0, "return_token_ids": True}
    biased = await client.post("/v1/completions", json=forced | {"logit_bias": {"11": 100}, "min_p": 0.5})
    assert biased.status_code == 200, biased.text
    assert biased.json()["choices"][0]["token_ids"] == [11, 11, 11]
    tokenized = await client.post("/tokenize", json={"model": "pirate", "prompt": prompt})
    assert tokenized.json()["tokens"] == ids


async def upload_copy(client, demo, adapter: str, name: str, folder: Path) -> None:
    """Register a copy of a demo adapter under new content, which no replica has loaded yet."""
    shutil.copytree(demo.adapters[adapter], folder)
    (folder / "README.md").write_text(f"{name}\n")
    files = [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]
    assert (await client.post("/v1/adapters", data={"name": name}, files=files)).status_code == 201


async def test_each_adapter_is_served_by_one_replica_and_base_requests_spread(client, demo, tmp_path):
    # Adapters of this test's own: concurrent first requests for an adapter, as the tests before
    # send, may load it on both replicas before the router hears of the first load. Here one
    # request loads each on one replica, and the rest start once the cluster view reports it there.
    models = {"pirate": "affine-pirate", "poet": "affine-poet"}
    served: dict[str, str] = {}
    for adapter, name in models.items():
        await upload_copy(client, demo, adapter, name, tmp_path / name)
        served[name] = (await chat(client, name)).headers["x-lora-gateway-replica"]

    async def resident():
        held = {name for replica in await cluster(client) for name in replica["resident_adapters"]}
        return set(models.values()) <= held

    await until(resident, 30)
    # The replicas report their adapters to Serve's controller every 0.1 s, and the controller passes
    # them on to the ingress's router; until it has, a request for the adapter goes to the replica
    # with the fewest (docs/benchmarks.md, the report delay), which loads it a second time.
    await asyncio.sleep(ROUTER_HEARS_SECONDS)
    after: dict[str, Counter[str]] = defaultdict(Counter)
    for _ in range(AFFINE_ROUNDS):
        for model in models.values():
            after[model][(await chat(client, model)).headers["x-lora-gateway-replica"]] += 1
    # Serve's affinity is a preference: a replica that misses its queue probe loses that request
    # to another. One such miss is allowed; routing blind to the adapter spreads about evenly.
    for model, replicas in after.items():
        assert replicas.most_common(1)[0][1] >= AFFINE_ROUNDS - 1, (model, after, served)
    spread: Counter[str] = Counter()
    for _wave in range(4):  # Serve's router balances on the queue lengths it last probed
        base = await asyncio.gather(*(chat(client, "demo", max_tokens=96, ignore_eos=True) for _ in range(16)))
        spread.update(response.headers["x-lora-gateway-replica"] for response in base)
        if len(spread) == 2:
            break
    assert len(spread) == 2, spread


async def test_a_replica_killed_while_the_deployment_starts_is_replaced_and_the_service_stays_up(
    client, ray_gateway, reference
):
    assert len(ray_gateway.killed_during_start) == 1, "the fixture saw no engine replica start"
    replicas = await until(lambda: _healthy_replicas(client, 2), 180)
    assert ray_gateway.killed_during_start[0] not in {r["pid"] for r in replicas}
    assert ray_gateway.process.poll() is None
    assert text(await chat(client, "pirate")) == peft(reference, "pirate")


async def test_the_cluster_view_lists_both_replicas(client, ray_gateway):
    await chat(client, "pirate")
    replicas = await until(lambda: _healthy_replicas(client, 2), 60)
    assert len({r["id"] for r in replicas}) == 2 and len({r["pid"] for r in replicas}) == 2
    assert all(r["node"] and r["in_flight"] >= 0 for r in replicas)
    assert any("pirate" in r["resident_adapters"] for r in replicas)
    tenant_view = await client.get("/v1/cluster", headers={"Authorization": "Bearer nope"})
    assert tenant_view.status_code == 401


async def _healthy_replicas(client, count: int):
    replicas = [r for r in await cluster(client) if r["healthy"]]
    return replicas if len(replicas) == count else None


async def test_every_replicas_vllm_series_reach_prometheus_with_its_replica_id(client, ray_gateway):
    models = ("demo", "pirate", "poet", "demo")
    served: set[str] = set()
    last: dict = {}

    async def exported():
        # Ray exports what a replica recorded lately: keep the engines busy while looking.
        answers = await asyncio.gather(*(chat(client, model) for model in models))
        served.update(answer.headers["x-lora-gateway-replica"] for answer in answers)
        try:
            body = (await client.get(ray_gateway.metrics_url)).text
        except httpx.HTTPError as exc:
            last["error"] = repr(exc)
            return None
        lines = [line for line in body.splitlines() if line.startswith("ray_vllm_") and "ReplicaId=" in line]
        seen = {rid for rid in served if any(f'ReplicaId="{rid}"' in line for line in lines)}
        last.update(lines=len(lines), seen=seen, served=set(served), size=len(body))
        # Ray exports each series on its own schedule: wait for the request histogram as well.
        latency = any(line.startswith("ray_vllm_e2e_request_latency_seconds") for line in lines)
        return lines if seen == served and latency else None

    try:
        await until(exported, 120, step=3)
    except AssertionError:
        raise AssertionError(
            f"Ray's export at {ray_gateway.metrics_url} never had every replica's latency: {last}"
        ) from None
    # And the ingress counts each replica's requests per adapter.
    answers = await asyncio.gather(*(chat(client, model) for model in models))
    wanted = {(answer.headers["x-lora-gateway-replica"], model) for model, answer in zip(models, answers, strict=True)}

    async def counted():  # a request is counted as its response ends, just after the client has it
        series = [
            line
            for line in (await client.get("/metrics")).text.splitlines()
            if line.startswith("lora_gateway_replica_requests_total{")
        ]
        return all(
            any(f'replica="{replica}"' in line and f'adapter="{model}"' in line for line in series)
            for replica, model in wanted
        )

    await until(counted, 10, step=0.2)


def engine_processes_of(replica_pid: int) -> list[int]:
    """Live processes whose environment names this replica as their owner."""
    from server.engine.ray_replica import OWNER_ENV

    marker = f"{OWNER_ENV}={replica_pid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


async def test_a_client_that_leaves_mid_stream_aborts_its_engine_request(client):
    body = {
        "model": "poet",
        "prompt": "The sea",
        "max_tokens": 1000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    started = time.monotonic()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        replica = response.headers["x-lora-gateway-replica"]
        async for _line in response.aiter_lines():
            break  # the first tokens arrived; leave

    async def idle():
        for r in await cluster(client):
            if r["id"] == replica and r["in_flight"] == 0 and r["reported_at"] > started + 0.5:
                return True
        return False

    await until(idle, 10, step=0.2)
    idle_after = time.monotonic() - started
    whole = time.monotonic()
    full = await client.post("/v1/completions", json=body | {"stream": False})
    assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] == body["max_tokens"]
    full_seconds = time.monotonic() - whole
    # The abandoned request stopped long before it could have finished.
    assert idle_after < full_seconds, (idle_after, full_seconds)


async def test_when_a_replicas_engine_dies_mid_stream_it_fails_its_health_check_and_is_replaced(
    client, reference, demo, tmp_path
):
    """The engine core of the replica that serves an adapter registered through the ingress dies
    under a stream: the stream ends cleanly, the adapter serves on, the replica fails its health
    check and Serve replaces it. (A replica killed outright is the fixture's, as it starts.)"""
    import psutil

    await upload_copy(client, demo, "pirate", "corsair", tmp_path / "corsair")  # no replica has seen it
    first = await chat(client, "corsair")
    assert text(first) == peft(reference, "pirate")

    # Four sequences of 900 tokens: long enough that the kill lands before they end, on a quiet machine too.
    body = {"model": "corsair", "prompt": "The sea", "max_tokens": 900, "ignore_eos": True, "stream": True, "n": 4}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        holder = response.headers["x-lora-gateway-replica"]
        victim = next(r for r in await cluster(client) if r["id"] == holder)
        lines = response.aiter_lines()
        await anext(lines)
        replica = psutil.Process(victim["pid"])
        # The engine core is the replica's own child; anything below it goes with it.
        engine_cores = [p for p in engine_processes(replica) if p.ppid() == replica.pid]
        assert engine_cores, f"no engine under replica {replica.pid}"
        for core in engine_cores:
            core.kill()
        rest = [line async for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert any('"error"' in line for line in rest), rest[-3:]

    # Traffic recovers on the survivor, which had never seen the adapter, or on the replacement.
    async def serves_again():
        response = await chat(client, "corsair")
        return response if response.status_code == 200 else None

    again = await until(serves_again, 90, step=1)
    assert text(again) == peft(reference, "pirate")
    assert again.headers["x-lora-gateway-replica"] != holder

    async def replaced():
        replicas = await _healthy_replicas(client, 2)
        return replicas if replicas and holder not in {r["id"] for r in replicas} else None

    await until(replaced, 180, step=2)
    await until(lambda: _none_left(victim["pid"]), 60, step=1)
    for model in ("demo", "poet"):
        assert text(await chat(client, model)) == peft(reference, None if model == "demo" else model)


async def _none_left(replica_pid: int) -> bool:
    return not engine_processes_of(replica_pid)

"""Fair sharing on the real engine (the demo model): a flood from one tenant, and training time limits.

Bounds are loose: the machine is shared and ratios are noisy. bench/fairness.py measures the
tight targets (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import httpx
import pytest

from adapters.demo import DEMO_PROMPT
from tests.engine.conftest import ADMIN_KEY
from tests.engine.test_metrics_scrape import Scrape
from tests.training_data import TRAINING_ROWS, jsonl

pytestmark = pytest.mark.engine
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# Nearly four engine batches (the session gateway's --max-num-seqs is 64), past the fair queue's depth (96),
# within its --max-in-flight (256).
FLOOD = 240


async def new_tenant(client: httpx.AsyncClient, name: str, **limits) -> dict[str, str]:
    response = await client.post("/v1/tenants", json={"name": name, "limits": limits}, headers=ADMIN)
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['api_key']}"}


@dataclass
class Answer:
    latency: float
    text: str
    tokens: int  # prompt and completion


async def flood_then_light(
    client: httpx.AsyncClient,
    flooder: dict,
    light: dict,
    *,
    model: str = "demo",
    max_tokens: int = 32,
    running: int = 0,
) -> tuple[list[Answer], list[Answer]]:
    """FLOOD requests of one tenant at once, then 4 of another: each one's answer. Each asks `model`
    the demo's question, greedily, for `max_tokens` tokens (past the end of its answer). The light
    ones go once the engine runs `running` of the flood's (vLLM's gauge), or the gateway holds most."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": DEMO_PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }

    async def one(headers: dict) -> Answer:
        sent = time.monotonic()
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        text = response.json()["choices"][0]["message"]["content"]
        return Answer(time.monotonic() - sent, text, usage["prompt_tokens"] + 2 * usage["completion_tokens"])

    flood = [asyncio.create_task(one(flooder)) for _ in range(FLOOD)]
    for _ in range(500):  # until the flood has reached the gateway (fair: most of it waits there; fcfs: in vLLM)
        state = (await client.get("/v1/scheduling", headers=ADMIN)).json()
        if state["in_flight"] + state["waiting"] >= FLOOD * 3 // 4:
            if (
                not running
                or Scrape((await client.get("/metrics", headers=ADMIN)).text).total("vllm:num_requests_running")
                >= running
            ):
                break
        await asyncio.sleep(0.02)
    light_answers = await asyncio.gather(*(one(light) for _ in range(4)))
    return list(await asyncio.gather(*flood)), list(light_answers)


def preemptions(scrape: str) -> float:
    return Scrape(scrape).total("vllm:num_preemptions_total")


async def test_a_light_tenant_is_served_ahead_of_another_tenants_flood(gateway, demo):
    # A connection per request: one kept alive could be closed by the server's keep-alive timeout as
    # the next request is sent on it, while the flood's requests wait their turn.
    limits = httpx.Limits(max_connections=FLOOD + 16, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=300, limits=limits) as client:
        flooder = await new_tenant(client, "flooder", max_concurrent=FLOOD, requests_per_second=1000)
        light = await new_tenant(client, "light", max_concurrent=8, requests_per_second=1000)
        state = (await client.get("/v1/scheduling", headers=ADMIN)).json()
        assert state["policy"] == "fair" and state["depth"] == 96  # --max-num-seqs 64, and half as many again
        preempted_before = preemptions((await client.get("/metrics", headers=ADMIN)).text)
        # The light ones go once the flood fills the engine's batch; the flood's requests are long, so
        # that no slot frees meanwhile.
        flood, light_answers = await flood_then_light(client, flooder, light, model="pirate", max_tokens=96, running=64)
        # The light tenant's requests go in at once, each preempting one of the flood's running
        # ones (server/engine/fair_scheduler.py), and take no longer than the flood's first batch.
        flood_latencies = sorted(answer.latency for answer in flood)
        light_latencies = [answer.latency for answer in light_answers]
        assert statistics.median(light_latencies) < 0.6 * flood_latencies[-1], (light_latencies, flood_latencies)
        scrape = (await client.get("/metrics", headers=ADMIN)).text
        assert preemptions(scrape) >= preempted_before + 1
        # Preempted, their requests resumed with the same answer (the pirate's, then whatever follows
        # past its end, which greedy decoding need not repeat in batches of other sizes).
        assert all(answer.text.startswith(demo.answers["pirate"]) for answer in [*flood, *light_answers])

        service = {
            line.split('"')[1]: float(line.split()[-1])
            for line in scrape.splitlines()
            if line.startswith("lora_gateway_tenant_service_tokens_total{")
        }
        # Each request: its prompt's tokens once, and its output tokens at weight 2.
        assert service["light"] == sum(answer.tokens for answer in light_answers)
        assert service["flooder"] == sum(answer.tokens for answer in flood)
        assert 'lora_gateway_tenant_queue_wait_seconds_count{tenant="flooder"}' in scrape
        # (The mean waits in the gateway's queue do not compare: the first --fair-queue-depth of the
        # flood's requests, more than --max-num-seqs, go to the engine at once and wait there.)


async def test_the_scheduling_policy_is_the_admins_to_change(gateway):
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        tenant = await new_tenant(client, "not-admin")
        assert (await client.get("/v1/scheduling", headers=tenant)).status_code in (401, 403)
        assert (await client.patch("/v1/scheduling", json={"policy": "fcfs"}, headers=tenant)).status_code in (401, 403)
        switched = await client.patch("/v1/scheduling", json={"policy": "fcfs"}, headers=ADMIN)
        assert switched.status_code == 200 and switched.json()["policy"] == "fcfs"
        back = await client.patch("/v1/scheduling", json={"policy": "fair"}, headers=ADMIN)
        assert back.json()["policy"] == "fair"
        bad = await client.patch("/v1/scheduling", json={"policy": "priority"}, headers=ADMIN)
        assert bad.status_code == 400 and bad.json()["error"]["param"]
        weight = await client.patch("/v1/tenants/not-admin", json={"limits": {"weight": 0}}, headers=ADMIN)
        assert weight.status_code == 400 and "positive" in weight.json()["error"]["message"]
        card = await client.patch("/v1/tenants/not-admin", json={"limits": {"weight": 3}}, headers=ADMIN)
        assert card.json()["limits"]["weight"] == 3


async def test_a_job_past_its_time_limit_fails_and_keeps_its_checkpoints(gateway):
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        tenant = await new_tenant(client, "slow-trainer")
        files = {"file": ("long.jsonl", jsonl(TRAINING_ROWS * 4))}  # an epoch, and so a checkpoint, in seconds
        upload = await client.post("/v1/files", files=files, data={"purpose": "fine-tune"}, headers=tenant)
        assert upload.status_code == 200, upload.text
        hyper = {"n_epochs": 50}
        body = {"model": "demo", "training_file": upload.json()["id"], "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}  # fmt: skip
        job = (await client.post("/v1/fine_tuning/jobs", json=body, headers=tenant)).json()
        checkpoints: list = []
        deadline = time.monotonic() + 240
        while not checkpoints and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            listed = await client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=tenant)
            checkpoints = listed.json()["data"]
        assert checkpoints, "the job saved no checkpoint in time"
        # The admin lowers the tenant's limit below what the job has run: it stops within seconds.
        lowered = await client.patch("/v1/tenants/slow-trainer", json={"limits": {"max_training_seconds": 1}}, headers=ADMIN)  # fmt: skip
        assert lowered.json()["limits"]["max_training_seconds"] == 1
        stopped_at = time.monotonic()
        while time.monotonic() - stopped_at < 30:
            current = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=tenant)).json()
            if current["status"] != "running":
                break
            await asyncio.sleep(0.5)
        assert current["status"] == "failed", current
        assert current["error"]["code"] == "time_limit_exceeded"
        assert "time limit of 1 seconds" in current["error"]["message"] and "checkpoints" in current["error"]["message"]
        assert current["fine_tuned_model"] is None
        kept = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", headers=tenant)).json()["data"]
        assert len(kept) >= len(checkpoints)

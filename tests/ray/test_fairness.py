"""The fair queue with --ray: it runs in the ingress, in front of both engine replicas, and a flood
from one tenant does not queue ahead of another tenant's requests. The bound is loose (the machine
is shared); bench/fairness.py measures the tight targets on one engine."""

from __future__ import annotations

import statistics

import httpx
import pytest

from tests.engine.conftest import ADMIN_KEY
from tests.engine.test_fairness import FLOOD, flood_then_light, new_tenant

pytestmark = [pytest.mark.engine, pytest.mark.ray, pytest.mark.timeout(300)]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_the_ingress_serves_a_light_tenant_ahead_of_another_tenants_flood(ray_gateway):
    limits = httpx.Limits(max_connections=FLOOD + 16)
    async with httpx.AsyncClient(base_url=ray_gateway.url, timeout=300, limits=limits) as client:
        state = (await client.get("/v1/scheduling", headers=ADMIN)).json()
        # Both replicas' batches (2 × --max-num-seqs 64) and half as many again: the flood is past it.
        assert state["policy"] == "fair" and state["depth"] == 192 < FLOOD
        flooder = await new_tenant(client, "ray-flooder", max_concurrent=FLOOD, requests_per_second=1000)
        light = await new_tenant(client, "ray-light", max_concurrent=8, requests_per_second=1000)
        flood_answers, light_answers = await flood_then_light(client, flooder, light)  # to the base model
        flood = [answer.latency for answer in flood_answers]
        light_latencies = [answer.latency for answer in light_answers]
        # First come, the light requests would wait behind the whole backlog, past the flood's mean.
        # (Their mean wait in the queue is no measure here: only the flood's last 48 wait in it at all.)
        assert statistics.median(light_latencies) < statistics.mean(flood), (light_latencies, sorted(flood))

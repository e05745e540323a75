"""One tenant's uploads and another tenant's calls side by side on the real gateway (adapters/work.py).

On the session's real gateway: while one tenant runs ten MiniMind uploads at once (each a pickle
converted in the sandbox, two at a time), another tenant lists models and files and asks for a
one-token completion over and over. Every upload is registered and every call of the reader's
answers.

A conversion of a file this small takes a few hundredths of a second, as long as a loaded
machine's noise, so this test sets no bound on the reader's latency: tests/test_work.py makes each
conversion slow and bounds the listings against it. The figures (a few ms for the listings, tens
for the completion) are the benchmark's: docs/benchmarks.md#another-tenants-calls-while-one-uploads.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest
import torch

from tests.engine.conftest import ADMIN_KEY
from tests.engine.test_adapter_forms import minimind_lora

pytestmark = pytest.mark.engine

UPLOADS = 10
MIN_SAMPLES = 20


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


async def new_tenant(admin: httpx.AsyncClient, name: str, **limits) -> dict[str, str]:
    response = await admin.post("/v1/tenants", json={"name": name, "limits": limits})
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['api_key']}"}


async def test_ten_minimind_uploads_register_while_another_tenants_calls_answer(gateway, tmp_path):
    torch.save(minimind_lora(), tmp_path / "lora.pth")
    pth = (tmp_path / "lora.pth").read_bytes()
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=admin_headers, timeout=300) as admin:
        uploader = await new_tenant(admin, "uploader", max_concurrent=UPLOADS)
        reader = await new_tenant(admin, "reader", requests_per_second=1000)
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=300) as client:
                latencies, quickest_upload = await _measure_during_uploads(client, uploader, reader, pth)
        finally:
            for name in ("uploader", "reader"):
                await admin.delete(f"/v1/tenants/{name}")
    shown = {
        kind: (len(s), round(statistics.median(s) * 1000, 1), round(p99(s) * 1000, 1)) for kind, s in latencies.items()
    }
    print(f"(samples, median ms, p99 ms): {shown}; the quickest upload: {quickest_upload * 1000:.0f} ms")
    assert all(len(samples) >= MIN_SAMPLES for samples in latencies.values()), shown


async def _measure_during_uploads(
    client: httpx.AsyncClient, uploader: dict[str, str], reader: dict[str, str], pth: bytes
) -> tuple[dict[str, list[float]], float]:
    """The reader's latencies by call, and the quickest upload's duration."""

    async def upload(i: int) -> tuple[httpx.Response, float]:
        files = [("file", ("lora.pth", pth))]
        data = {"name": f"mm{i}", "format": "minimind"}
        started = time.perf_counter()
        response = await client.post("/v1/adapters", data=data, files=files, headers=uploader)
        return response, time.perf_counter() - started

    uploads = [asyncio.create_task(upload(i)) for i in range(UPLOADS)]
    calls = {
        "GET /v1/models": lambda: client.get("/v1/models", headers=reader),
        "GET /v1/files": lambda: client.get("/v1/files", headers=reader),
        "1-token completion": lambda: client.post(
            "/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 1}, headers=reader
        ),
    }
    latencies: dict[str, list[float]] = {kind: [] for kind in calls}
    await asyncio.sleep(0.5)  # the uploads are read and waiting for sandbox slots
    while not all(task.done() for task in uploads) or min(map(len, latencies.values())) < MIN_SAMPLES:
        for kind, call in calls.items():
            started = time.perf_counter()
            response = await call()
            latencies[kind].append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
        await asyncio.sleep(0.05)
    answers = [response for response, _ in await asyncio.gather(*uploads)]
    assert [r.status_code for r in answers] == [201] * UPLOADS, [r.text for r in answers if r.status_code != 201]
    return latencies, min(task.result()[1] for task in uploads)

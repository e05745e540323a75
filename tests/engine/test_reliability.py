"""Faults on the real engine: clients that leave, an engine that dies, and a gateway killed outright."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time

import httpx
import psutil
import pytest

from adapters.demo import DEMO_PROMPT
from tests.conftest import full_gateway
from tests.engine.conftest import ADMIN_KEY, start_gateway, stop_gateway
from tests.training_data import start_long_job

pytestmark = pytest.mark.engine

LONG = {"prompt": "The ship", "max_tokens": 600, "ignore_eos": True, "temperature": 0}


def metric(text: str, name: str) -> float:
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
    assert values, f"{name} is not in the scrape"
    return sum(values)


async def settle(client: httpx.AsyncClient) -> tuple[float, float]:
    """Wait until the engine runs nothing; then (running, generated tokens so far)."""
    deadline = time.monotonic() + 20
    while True:
        scrape = (await client.get("/metrics")).text
        running = metric(scrape, "vllm:num_requests_running")
        if running == 0 or time.monotonic() > deadline:
            return running, metric(scrape, "vllm:generation_tokens_total")
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "before-the-answer"])
async def test_client_disconnect_aborts_the_engine_request(gateway, stream):
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as client:
        _, before = await settle(client)
        payload = {"model": "pirate", **LONG, "stream": stream}
        if stream:
            async with client.stream("POST", "/v1/completions", json=payload) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        break  # the first token arrived: leave mid-stream
        else:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json=payload, timeout=0.5)
        running, generated = await settle(client)
        assert running == 0
        await asyncio.sleep(1.0)
        _, later = await settle(client)
        assert later == generated  # nothing more was produced for the departed client
        assert generated - before < 300  # stopped well before its 600 tokens


def job_status(client: httpx.Client, job_id: str, statuses: set[str], seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


async def test_a_gateway_loses_nothing_when_its_engine_dies_or_it_is_killed_during_a_job(demo, tmp_path):
    """Two faults, each followed by a restart on the same state (one gateway start fewer than two
    tests of their own): the engine dies, and the gateway answers 503 and exits 3; then the whole
    gateway is killed outright during a fine-tuning job, and the next start marks the job failed.

    That last start needs no engine (the scheduler marks the job before any request), so it is the
    whole app in this process over a FakeEngine, on the killed gateway's state dir."""
    state = tmp_path / "state"
    args = ["--demo-dir", str(demo.root), "--state-dir", str(state), "--max-cpu-loras", "4", "--admin-key", ADMIN_KEY]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    first = start_gateway(args, tmp_path / "first.log", base_name="demo")
    try:
        with httpx.Client(base_url=first.url, headers=admin, timeout=60) as client:
            registered = client.post("/v1/adapters", json={"name": "survivor", "path": str(demo.adapters["poet"])})
            assert registered.status_code == 201
            engine_processes = psutil.Process(first.process.pid).children(recursive=True)
            assert engine_processes
            for process in engine_processes:
                process.send_signal(signal.SIGKILL)
            answers, dropped = [], []
            deadline = time.monotonic() + 30
            while first.process.poll() is None and time.monotonic() < deadline:
                try:
                    answers.append(
                        client.post(
                            "/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2}
                        ).status_code
                    )
                except httpx.ConnectError:
                    pass  # the gateway has closed its socket on its way out
                except httpx.HTTPError as exc:
                    dropped.append(repr(exc))  # taken, then never answered
                time.sleep(0.1)
            assert first.process.wait(timeout=60) == 3, first.log_tail()
            assert all(status == 503 for status in answers[1:]), answers  # the first may have raced the kill
            assert dropped == [], first.log_tail()
            assert "drain time is up" not in first.log_tail(), "a request was left waiting on the dead engine"
    finally:
        stop_gateway(first)

    second = start_gateway(args, tmp_path / "second.log", base_name="demo")
    try:
        with httpx.Client(base_url=second.url, headers=admin, timeout=60) as client:
            reply = client.post(
                "/v1/chat/completions",
                json={"model": "survivor", "messages": [{"role": "user", "content": DEMO_PROMPT}], "temperature": 0},
            )
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == demo.answers["poet"]

            job = start_long_job(client)  # to be running when the machine goes down
            assert job_status(client, job["id"], {"running", "failed"}, 60)["status"] == "running"
    finally:
        # As a machine or container that goes down takes them all: the gateway, its engine's
        # processes and the training worker at once.
        processes = [second.process.pid, *(p.pid for p in psutil.Process(second.process.pid).children(recursive=True))]
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        second.process.wait()

    async with full_gateway(state, demo_dir=demo.root) as third:
        deadline = time.monotonic() + 30
        while True:
            answer = await third.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=third.admin)
            assert answer.status_code == 200, answer.text
            failed = answer.json()
            if failed["status"] in {"failed", "succeeded"} or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert failed["status"] == "failed" and failed["error"]["code"] == "gateway_restarted", failed
        assert "not resumed" in failed["error"]["message"]

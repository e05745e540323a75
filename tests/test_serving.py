"""Graceful drain: in-process for the 503, and a real server process (tests/drain_server.py) signalled."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import full_gateway

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_draining(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {
        "error": {
            "message": "the server is shutting down; retry against another replica",
            "type": "service_unavailable_error",
            "param": None,
            "code": "draining",
        }
    }
    assert response.headers["retry-after"] == "1"


async def test_draining_refuses_new_requests_but_answers_probes(tmp_path):
    async with full_gateway(tmp_path / "state") as gw:
        body = {"model": "base", "prompt": "hi", "max_tokens": 2}
        assert (await gw.client.post("/v1/completions", json=body, headers=gw.admin)).status_code == 200
        gw.app.state.gate.draining = True
        response = await gw.client.post("/v1/completions", json=body, headers=gw.admin | {"X-Request-ID": "late"})
        assert_draining(response)
        assert response.headers["x-request-id"] == "late"
        assert_draining(await gw.client.get("/v1/models", headers=gw.admin))
        assert (await gw.client.get("/health")).status_code == 200
        metrics = (await gw.client.get("/metrics", headers=gw.admin)).text
    assert 'lora_gateway_requests_total{adapter="none",endpoint="completions",status="503"} 1.0' in metrics
    assert 'lora_gateway_requests_total{adapter="none",endpoint="/v1/models",status="503"} 1.0' in metrics
    assert gw.engine.generated and len(gw.engine.generated) == 1


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_entries(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


@pytest.fixture
def start_server(tmp_path) -> Iterator:
    started: list[ServerProcess] = []

    def start(drain_seconds: float) -> ServerProcess:
        port = free_port()
        log_path = tmp_path / f"server-{len(started)}.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.drain_server", str(port), str(tmp_path), str(drain_seconds)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
        started.append(server)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{server.url}/ready", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready in {STARTUP_SECONDS} s:\n{log_path.read_text()}")

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


async def wait_exit(process: subprocess.Popen, timeout: float) -> int:
    return await asyncio.to_thread(process.wait, timeout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_in_flight_streams_then_exits_0(start_server, sig):
    server = start_server(drain_seconds=20)
    body = {"model": "base", "prompt": "hi", "max_tokens": 10, "stream": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        async with client.stream("POST", "/v1/completions", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            first = await anext(line async for line in lines if line)
            assert first.startswith("data: {")
            signalled_at = time.monotonic()
            server.process.send_signal(sig)

            # At once: not ready, new work refused, the process still alive and probed.
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
            assert_draining(await client.post("/v1/completions", json=body | {"stream": False}))
            assert (await client.get("/health")).status_code == 200
            assert server.process.poll() is None

            events = [first] + [line async for line in lines if line]
    assert events[-1] == "data: [DONE]"
    texts = [json.loads(event.removeprefix("data: "))["choices"][0]["text"] for event in events[:-1]]
    assert texts == [f"base-{i} " for i in range(10)]

    assert await wait_exit(server.process, 15) == 0
    # It waited for the stream (about 9 more steps of 0.2 s), not for the 20 s drain limit.
    assert time.monotonic() - signalled_at < 10
    messages = [entry["message"] for entry in server.log_entries()]
    assert "drained; shutting down" in messages
    assert messages.index("drained; shutting down") < messages.index("engine shut down")
    assert messages[-1] == "serve_app returned"


async def test_drain_stops_waiting_after_drain_seconds(start_server):
    server = start_server(drain_seconds=1)
    body = {"model": "base", "prompt": "hi", "max_tokens": 200, "stream": True}  # 40 s of tokens
    events = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with pytest.raises(httpx.HTTPError):  # the stream is cut, not finished
            async with client.stream("POST", "/v1/completions", json=body) as stream:
                async for line in stream.aiter_lines():
                    if line and not events:
                        signalled_at = time.monotonic()
                        server.process.send_signal(signal.SIGTERM)
                    if line:
                        events.append(line)
    assert "data: [DONE]" not in events
    assert await wait_exit(server.process, 15) == 0
    elapsed = time.monotonic() - signalled_at
    assert 1 <= elapsed < 1 + 2 + 3  # drain_seconds, uvicorn's grace, slack
    messages = [entry["message"] for entry in server.log_entries()]
    assert "drain time is up; shutting down with requests in flight: 1" in messages
    assert "engine shut down" in messages


async def test_a_second_signal_skips_the_rest_of_the_drain(start_server):
    server = start_server(drain_seconds=30)
    body = {"model": "base", "prompt": "hi", "max_tokens": 200, "stream": True}
    events = []
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        with pytest.raises(httpx.HTTPError):
            async with client.stream("POST", "/v1/completions", json=body) as stream:
                async for line in stream.aiter_lines():
                    if line and not events:
                        server.process.send_signal(signal.SIGTERM)
                    if line:
                        events.append(line)
                    if len(events) == 3:  # draining by now
                        signalled_at = time.monotonic()
                        server.process.send_signal(signal.SIGTERM)
    assert await wait_exit(server.process, 15) == 0
    assert time.monotonic() - signalled_at < 2 + 3  # uvicorn's grace, slack; not the 30 s drain
    messages = [entry["message"] for entry in server.log_entries()]
    assert "drained; shutting down" not in messages
    assert "engine shut down" in messages


def test_every_line_the_server_logs_is_json(start_server):
    server = start_server(drain_seconds=5)
    assert (
        httpx.post(f"{server.url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2}).status_code
        == 200
    )
    os.kill(server.process.pid, signal.SIGTERM)
    assert server.process.wait(15) == 0
    entries = server.log_entries()  # raises if any line is not JSON
    requests = [entry for entry in entries if entry["logger"] == "lora_gateway.requests"]
    assert [(entry["path"], entry["status"]) for entry in requests] == [("/v1/completions", 200)]
    assert any(entry["logger"].startswith("uvicorn") for entry in entries)


def test_a_port_in_use_fails_fast_before_the_engine_starts(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    config = {"hidden_size": 64, "num_attention_heads": 1, "intermediate_size": 128, "num_hidden_layers": 1}
    (model / "config.json").write_text(json.dumps(config))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "server", "serve", "--model", str(model), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, "LORA_GATEWAY_STATE_DIR": str(tmp_path / "state")},
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--host/--port: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "starting engine" not in result.stdout + result.stderr and time.monotonic() - started < 60


def test_the_listener_is_bound_before_serving():
    from server.commands.serving import bind_listener

    sock = bind_listener("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
    finally:
        sock.close()

"""One real gateway (vLLM on CPU, the demo model) per test session, and PEFT references."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

STARTUP_SECONDS = 300
ADMIN_KEY = "test-admin-key-for-the-engine-tests-0123"
# Of memory, for every gateway a test starts unless it asks for another (the default 0.2 is ~4.7 GiB
# here, and takes seconds to set up): the demo's prompts are short, and gateways run side by side.
SMALL_KV_CACHE = "0.05"
# vLLM on CPU pins each engine's worker to core 0 by default and leaves the other cores to the
# gateway's own process: the test's gateways would all compute on that one core, beside each other
# and beside Ray's replicas. Unpinned, the kernel spreads them over the machine's cores.
ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningGateway:
    """A `lora-gateway serve` process and how to reach it."""

    url: str
    process: subprocess.Popen
    log_path: Path
    base_name: str
    adapters: dict[str, Path] = field(default_factory=dict)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_gateway(
    args: list[str],
    log_path: Path,
    base_name: str,
    env: dict[str, str] | None = None,
    prefix: list[str] = (),
) -> RunningGateway:
    """Start a gateway on a free port; once more on another port if that one was taken meanwhile.

    `prefix` runs it through another command that execs it (setpriv, say), so that the process
    started is the gateway itself.
    """
    try:
        return _start_gateway(args, log_path, base_name, env, prefix)
    except PortTaken:
        return _start_gateway(args, log_path, base_name, env, prefix)


class PortTaken(RuntimeError):
    """Another process bound the free port between free_port() and the gateway's bind."""


def _start_gateway(
    args: list[str], log_path: Path, base_name: str, env: dict[str, str] | None, prefix: list[str]
) -> RunningGateway:
    port = free_port()
    log = log_path.open("w")
    if "--kv-cache-fraction" not in args:
        args = [*args, "--kv-cache-fraction", SMALL_KV_CACHE]
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "server", "serve", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**ENGINE_ENV, **os.environ, **(env or {})},
    )
    gateway = RunningGateway(f"http://127.0.0.1:{port}", process, log_path, base_name)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if process.returncode == 2 and "cannot listen on" in gateway.log_tail():
                raise PortTaken(gateway.log_tail())
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.log_tail()}")
        try:
            if httpx.get(f"{gateway.url}/ready", timeout=2).status_code == 200:
                return gateway
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_gateway(gateway)
    raise RuntimeError(f"gateway not ready in {STARTUP_SECONDS} s:\n{gateway.log_tail()}")


STOP_SECONDS = 60
# Gateways told to stop whose exit nobody waited for (stop_gateway(..., wait=False)).
_stopping: list[RunningGateway] = []


def stop_gateway(*gateways: RunningGateway, wait: bool = True) -> None:
    """SIGTERM the gateways, which drain and stop side by side; then wait for each to exit.

    A gateway takes 5 to 20 s to stop (vLLM waits for its engine's processes). wait=False, for a
    gateway whose state nothing reads after it, leaves that wait to the end of the session, so the
    next tests run meanwhile; the session still waits for every one of them.
    """
    for gateway in gateways:
        if gateway.process.poll() is None:
            gateway.process.terminate()
    if not wait:
        _stopping.extend(gateways)
        return
    for gateway in gateways:
        _wait_for_exit(gateway)


def _wait_for_exit(gateway: RunningGateway) -> None:
    try:
        gateway.process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait()


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _stopping:
        _wait_for_exit(_stopping.pop())


@pytest.fixture(scope="session")
def gateway(demo, tmp_path_factory) -> Iterator[RunningGateway]:
    """The session's real gateway, with an admin key; every engine test that can share one does.

    Each start costs half a minute or more of the machine's two cores, so there is one per process
    (under `make test`, the files that ask for it go to one xdist worker as one group: see
    tests/conftest.py): tests that need no tenant send the admin key. --max-loras 1: the mixed-batch and metrics tests
    rely on one adapter slot. Its KV cache is small (the demo's prompts are short), so that the
    gateways some tests start of their own fit beside it. No test may rely on what another file's
    tests left in it: the files run in either order.
    """
    state = tmp_path_factory.mktemp("state")
    args = [
        "--demo-dir", str(demo.root), "--state-dir", str(state), "--admin-key", ADMIN_KEY,
        "--max-loras", "1", "--max-cpu-loras", "8", "--kv-cache-fraction", SMALL_KV_CACHE,
    ]  # fmt: skip
    running = start_gateway(args, state / "gateway.log", base_name="demo")
    running.adapters = dict(demo.adapters)
    running.state_dir = state
    yield running
    stop_gateway(running, wait=False)  # nothing reads its state after

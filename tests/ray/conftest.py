"""One `lora-gateway serve --ray --replicas 2` per session: a local Ray, an ingress, two engine
replicas of the demo model on CPU."""

from __future__ import annotations

import random
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.conftest import ADMIN_KEY, RunningGateway, start_gateway, stop_gateway


def port_outside_the_ephemeral_range() -> int:
    """A free port that Ray's own processes, which bind ephemeral ports as they start, cannot take first."""
    low, _high = (int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for port in random.Random().sample(range(20000, min(low, 30000)), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


ENGINE_REPLICA_TITLE = "ServeReplica:lora-gateway:engine"
# Secrets the gateway is started with, in its environment: tests/ray/test_secrets.py looks for
# them in Ray's processes and the engines'.
SECRET_ENV = {
    "LORA_GATEWAY_METRICS_KEY": "ray-metrics-canary-0123456789abcdefghijklmnop",
    "AWS_SECRET_ACCESS_KEY": "ray-store-canary-0123456789abcdefghijklmnop",
    "HF_TOKEN": "ray-hub-canary-0123456789abcdefghijklmnop",
}


def engine_replicas_under(marker: str) -> list:
    """The engine replica processes of the gateway whose command line holds `marker`."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if ENGINE_REPLICA_TITLE in " ".join(process.info["cmdline"] or ()) and any(
                marker in " ".join(parent.cmdline()) for parent in process.parents()
            ):
                found.append(process)
        except psutil.Error:
            pass
    return found


def kill_a_replica_while_both_start(marker: str, seconds: float, killed: list[int]) -> None:
    """Once both engine replicas exist, and while they still load their engines, SIGKILL one.

    Early, so that its replacement starts soon; the engine processes a replica killed later leaves
    behind are reaped by the next replica (tests/test_ray_app.py checks the reaper)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        replicas = engine_replicas_under(marker)
        if len(replicas) >= 2:
            victim = min(replicas, key=lambda p: p.pid)
            victim.kill()
            killed.append(victim.pid)
            return
        time.sleep(0.2)


def engine_processes(replica) -> list:
    """The vLLM processes a replica spawned: all below it but multiprocessing's resource tracker.
    They are not found by their titles ("VLLM::EngineCore"), which a replica's engine does not
    always get to set (one started as a replacement on a busy machine was seen without)."""
    import psutil

    found = []
    for child in replica.children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def wait_for_healthy_replicas(url: str, count: int, seconds: float) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/v1/cluster", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
            replicas = response.json()["data"] if response.status_code == 200 else []
            if sum(1 for replica in replicas if isinstance(replica, dict) and replica.get("healthy")) >= count:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"fewer than {count} healthy engine replicas after {seconds:g} s")


@pytest.fixture(scope="package")
def ray_gateway(demo, tmp_path_factory) -> Iterator[RunningGateway]:
    """The gateway for tests/ray/, which run in a row; Ray stops once they are done, not at the end
    of the session, so that its processes leave the machine to the tests after them."""
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("Ray Serve is not installed: pip install -e '.[test]' (the ray extra)")
    state = tmp_path_factory.mktemp("ray-state")
    metrics_port = port_outside_the_ephemeral_range()
    # A replica that dies while the deployment is still starting must not take the service down:
    # every session's gateway starts through one such death.
    killed_during_start: list[int] = []
    killer = threading.Thread(
        target=kill_a_replica_while_both_start, args=(str(state), 240, killed_during_start), daemon=True
    )
    killer.start()
    running = start_gateway(
        [
            "--ray",
            "--replicas",
            "2",
            "--replica-cpus",
            "0.5",  # two replicas leave one of this machine's two CPUs to a fine-tuning task
            "--training-cpus",
            "1",
            "--demo-dir",
            str(demo.root),
            "--state-dir",
            str(state),
            "--admin-key",
            ADMIN_KEY,
            "--max-cpu-loras",
            "4",
            "--ray-metrics-port",
            str(metrics_port),
            "--drain-seconds",
            "5",
        ],  # fmt: skip
        state / "gateway.log",
        base_name="demo",
        env=SECRET_ENV,
    )
    killer.join(1)
    running.killed_during_start = killed_during_start
    # The gateway is ready with one engine replica; the tests start once the killed one's
    # replacement serves too, so that affinity is judged over both.
    wait_for_healthy_replicas(running.url, 2, 240)
    running.adapters = dict(demo.adapters)
    running.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    running.marker = str(state)
    try:
        yield running
    finally:
        import psutil

        try:
            ray_processes = psutil.Process(running.process.pid).children(recursive=True)
        except psutil.Error:
            ray_processes = []
        stop_gateway(running)
        # The local Ray the gateway started is gone with it; make sure no process of it stays
        # (only of this one: another program's Ray on this machine is not ours to stop).
        for process in ray_processes:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(ray_processes, timeout=30)

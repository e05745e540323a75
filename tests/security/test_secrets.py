"""No secret of the gateway reaches a process it starts, nor another process of its user.

A real gateway runs as a user who is not root (as the images do), with an admin key given as a
flag and a catalog URL, store credentials, a database password and a hub token in its
environment (tests/security/gateway_as_nobody.py). Its engine's processes, a fine-tuning worker
and the pickle sandbox each run while their /proc/<pid>/environ and cmdline are read: none holds
any of those values. The gateway's own command line is free of them, and another process of its
user cannot read its environment.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.security.gateway_as_nobody import ADMIN_KEY, NobodyGateway
from tests.security.nonroot import as_nobody
from tests.training_data import start_long_job

pytestmark = pytest.mark.engine


def proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


class ChildWatcher(threading.Thread):
    """Reads every descendant's environ and cmdline as soon as it appears, until stopped."""

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(root_pid)
        self.seen: dict[str, tuple[str, str]] = {}  # "pid@start time" -> (cmdline, environ)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.look()
            time.sleep(0.02)

    def look(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            # A pid may be reused within a run: a process is its pid and its start time; and a child
            # seen between its fork and its exec shows its parent's command line, so that it counts
            # as a process of its own once it shows another.
            try:
                cmdline = proc_text(child.pid, "cmdline")
                key = f"{child.pid}@{child.create_time():.2f}@{hash(cmdline)}"
            except (OSError, psutil.Error):  # gone meanwhile, or not readable yet: look again next time
                continue
            if key not in self.seen:
                try:
                    environ = proc_text(child.pid, "environ")
                except OSError:
                    continue
                if cmdline:  # gone already (or a zombie): nothing to judge
                    self.seen[key] = (cmdline, environ)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)
        self.look()


def wait_until(predicate, timeout: float, what: str, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:g} s\n{log()}")


def leaks(seen: dict[str, tuple[str, str]], canaries: list[str]) -> dict[str, list[str]]:
    """Per process that shows any, the secrets in its command line or environment."""
    found = {}
    for pid, (cmdline, environ) in seen.items():
        if shown := [canary for canary in canaries if canary in cmdline + environ]:
            found[f"{pid} {cmdline[:80]}"] = shown
    return found


def test_no_secret_reaches_a_child_process_or_another_process_of_the_user(demo, nobody_gateway: NobodyGateway):
    gateway, folder, canaries = nobody_gateway.running, nobody_gateway.folder, nobody_gateway.canaries
    watcher = ChildWatcher(gateway.process.pid)
    watcher.start()
    try:
        watcher.look()  # the engine's processes, before anything else starts
        assert leaks(watcher.seen, canaries) == {}, "secrets in the engine's environment or command line"
        with httpx.Client(base_url=gateway.url, headers=nobody_gateway.admin, timeout=120) as client:
            job = start_long_job(client)  # a training worker, kept running long enough to be read
            wait_until(
                lambda: any("adapters.training.worker" in cmd for cmd, _ in watcher.seen.values()),
                120,
                "a training worker started",
                gateway.log_tail,
            )
            # The pickle sandbox: an adapter uploaded as adapter_model.bin is converted there.
            pirate = demo.adapters["pirate"]
            weights = folder / "adapter_model.bin"
            torch.save(load_file(str(pirate / "adapter_model.safetensors")), weights)
            files = [
                ("file", ("adapter_config.json", (pirate / "adapter_config.json").read_bytes())),
                ("file", ("adapter_model.bin", weights.read_bytes())),
            ]
            registered = client.post("/v1/adapters", data={"name": "pirate-bin"}, files=files)
            assert registered.status_code == 201, registered.text
            client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
        watcher.stop()
        kinds = {
            "sandbox": "adapters.sandbox",
            "training worker": "adapters.training.worker",
            "engine": "VLLM::EngineCore",
        }
        found = {kind: [pid for pid, (cmd, _) in watcher.seen.items() if mark in cmd] for kind, mark in kinds.items()}
        assert all(found.values()), f"not every kind of child was seen: {found}; {watcher.seen}"
        assert leaks(watcher.seen, canaries) == {}, "secrets in children's environment or command line"

        # The gateway itself: its command line shows no secret flag's value...
        own = proc_text(gateway.process.pid, "cmdline")
        assert "--admin-key" in own and ADMIN_KEY not in own
        # ...and no other process of its user reads its environment.
        reader = [sys.executable, "-I", "-c", f"open('/proc/{gateway.process.pid}/environ', 'rb').read()"]
        read = subprocess.run(as_nobody(reader, folder), capture_output=True, text=True, timeout=60)
        assert read.returncode != 0 and "PermissionError" in read.stderr, read.stdout + read.stderr
    finally:
        watcher.stopped.set()

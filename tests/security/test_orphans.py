"""A gateway killed with SIGKILL leaves no process of its tree running.

It runs no cleanup then, so each child must learn of its parent's death from the kernel: vLLM's
engine core and workers (server/engine/lifeline.py), the fine-tuning worker and the pickle
sandbox (adapters/confine.py). Every process of the tree must be gone within 10 s. The gateway
killed is the session's gateway as nobody (tests/security/gateway_as_nobody.py), once
test_secrets.py has read its children: one engine start serves both.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.security.gateway_as_nobody import NobodyGateway
from tests.security.nonroot import as_nobody, is_root, open_folder
from tests.security.test_sandbox_escape import HOLE, ROOT, Escape
from tests.training_data import start_long_job

GRACE_SECONDS = 10

# A sandbox child held busy: the tenant's code (past a hole opened in the unpickler) sleeps.
SLEEPER = "import os, time\nos.write(2, b'sleeping\\n')\ntime.sleep(600)\n"
DRIVER = """
import subprocess, sys
from pathlib import Path
root, workdir, hole = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, root)
from adapters import sandbox
real_popen = subprocess.Popen
def popen_with_a_hole(args, **kwargs):
    if list(args[:2]) != [sys.executable, "-I"]:  # another program (ctypes runs ldconfig)
        return real_popen(args, **kwargs)
    kwargs["stderr"] = open(workdir / "child-stderr", "wb")
    return real_popen([args[0], "-I", "-c", hole, root, args[-1]], **kwargs)
subprocess.Popen = popen_with_a_hole
sandbox.load_pickled_tensors(workdir / "sleeper.bin", "adapter_model.bin")
"""


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def survivors(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie has freed everything and only waits for a reaper."""
    alive = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
    return alive


def kill_and_wait(victim: subprocess.Popen, processes: list[psutil.Process]) -> list[str]:
    """SIGKILL the victim; what of `processes` still runs GRACE_SECONDS later (then killed too)."""
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    deadline = time.monotonic() + GRACE_SECONDS
    while (alive := survivors(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            described.append(f"{process.pid} {' '.join(process.cmdline())[:100]}")
            process.kill()
    return described


@pytest.mark.parametrize("as_root", [False, True], ids=["not-root", "root"])
def test_a_pickle_sandbox_dies_with_its_killed_parent(as_root):
    if as_root and not is_root():
        pytest.skip("runs as root only where the tests run as root (CI does)")
    workdir = open_folder("lgw-orphan-")
    try:
        (workdir / "sleeper.bin").write_bytes(pickle.dumps(Escape(SLEEPER), 2))
        (workdir / "sleeper.bin").chmod(0o644)
        command = [sys.executable, "-I", "-c", DRIVER, str(ROOT), str(workdir), HOLE]
        if not as_root:
            command = as_nobody(command, workdir, [ROOT])
        driver = subprocess.Popen(command, cwd=workdir, env={"PATH": os.environ.get("PATH", os.defpath)})
        try:
            deadline = time.monotonic() + 120
            stderr = workdir / "child-stderr"
            while not (stderr.exists() and b"sleeping" in stderr.read_bytes()):
                assert driver.poll() is None, "the driver exited before its sandbox child got busy"
                assert time.monotonic() < deadline, "the sandbox child never got busy"
                time.sleep(0.2)
            processes = tree(driver.pid)
            assert len(processes) == 2, [p.cmdline() for p in processes]  # the parent and its sandbox
        finally:
            left = kill_and_wait(driver, processes if "processes" in locals() else [])
        assert left == [], f"still running {GRACE_SECONDS} s after their parent was killed: {left}"
    finally:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


@pytest.mark.engine
@pytest.mark.last  # it kills the session's gateway as nobody, which test_secrets.py reads first
def test_a_killed_gateway_leaves_no_engine_or_training_process(nobody_gateway: NobodyGateway):
    gateway = nobody_gateway.running
    processes: list[psutil.Process] = []
    try:
        with httpx.Client(base_url=gateway.url, headers=nobody_gateway.admin, timeout=120) as client:
            start_long_job(client)
        deadline = time.monotonic() + 120
        while not any("adapters.training.worker" in " ".join(p.cmdline()) for p in tree(gateway.process.pid)[1:]):
            assert time.monotonic() < deadline, "no training worker started"
            time.sleep(0.5)
        processes = tree(gateway.process.pid)
        names = [" ".join(p.cmdline())[:60] for p in processes]
        assert any("EngineCore" in name for name in names), names
    finally:
        left = kill_and_wait(gateway.process, processes or tree(gateway.process.pid))
    assert left == [], f"still running {GRACE_SECONDS} s after the gateway was killed: {left}"

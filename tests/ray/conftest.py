"""One `lora-gateway serve --ray --replicas 2` per session: a local Ray, an ingress, two engine
replicas of the demo model on CPU."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.conftest import ADMIN_KEY, RunningGateway, start_gateway, stop_gateway

pytestmark = [pytest.mark.engine, pytest.mark.ray]


@pytest.fixture(scope="session")
def ray_gateway(demo, tmp_path_factory) -> Iterator[RunningGateway]:
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("Ray Serve is not installed: pip install -e '.[test]' (the ray extra)")
    state = tmp_path_factory.mktemp("ray-state")
    running = start_gateway(
        [
            "--ray",
            "--replicas",
            "2",
            "--replica-cpus",
            "1",
            "--demo-dir",
            str(demo.root),
            "--state-dir",
            str(state),
            "--admin-key",
            ADMIN_KEY,
            "--max-cpu-loras",
            "4",
            "--drain-seconds",
            "5",
        ],  # fmt: skip
        state / "gateway.log",
        base_name="demo",
    )
    running.adapters = dict(demo.adapters)
    try:
        yield running
    finally:
        stop_gateway(running)
        # The local Ray the gateway started is gone with it; make sure no process of it stays.
        subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True, timeout=60, check=False
        )

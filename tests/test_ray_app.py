"""server/ray_app.py without a cluster: the Serve options, and the config's builder importable."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import pytest
import yaml

from server.config import Settings
from server.ray_app import deployment_options

ROOT = Path(__file__).resolve().parents[1]


def test_a_fixed_count_or_autoscaling_bounds_pass_through():
    fixed = deployment_options(Settings(ray=True, replicas=3, replica_cpus=2, max_num_seqs=16))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2.0} and fixed["max_ongoing_requests"] == 32
    scaled = deployment_options(Settings(ray=True, min_replicas=1, max_replicas=8, target_ongoing_requests=12))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 8,
        "initial_replicas": 1,
        "target_ongoing_requests": 12.0,
    }


@pytest.mark.parametrize(
    "settings, flag",
    [
        ({"min_replicas": 1, "max_replicas": 2}, "--ray"),
        ({"ray": True, "lora_ops": "vllm"}, "--lora-ops"),
        ({"ray": True, "min_replicas": 1}, "--max-replicas"),
        ({"ray": True, "min_replicas": 3, "max_replicas": 2}, "--min-replicas"),
    ],
)
def test_inconsistent_ray_settings_are_refused_naming_the_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        Settings(**settings)


@pytest.mark.parametrize("path", ["deploy/ray/serve-config.yaml", "deploy/ray/rayservice.yaml"])
def test_the_serve_config_builds_the_application(path, demo, monkeypatch):
    # The admin key comes from the environment (rayservice.yaml: the Secret), never from the file.
    monkeypatch.setenv("LORA_GATEWAY_ADMIN_KEY", "an-admin-key-of-at-least-thirty-two-characters")
    document = yaml.safe_load((ROOT / path).read_text())
    config = yaml.safe_load(document["spec"]["serveConfigV2"]) if "spec" in document else document
    (application,) = config["applications"]
    module_name, _, attribute = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attribute)
    args = application["args"] | {"model": str(demo.base)}
    built = builder(args)
    assert type(built).__name__ == "Application"
    settings = Settings(ray=True, **args)
    assert settings.min_replicas == application["args"]["min_replicas"]


def test_engine_processes_of_a_dead_replica_are_reaped_and_a_live_ones_are_not():
    import os
    import subprocess
    import sys

    from server.engine.ray_replica import OWNER_ENV, reap_orphaned_engines

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    orphan = subprocess.Popen(sleeper, env={**os.environ, OWNER_ENV: str(dead.pid)})
    kept = subprocess.Popen(sleeper, env={**os.environ, OWNER_ENV: str(os.getpid())})
    try:
        deadline = time.monotonic() + 10
        while b"time.sleep" not in Path(f"/proc/{orphan.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert reap_orphaned_engines() >= 1
        assert orphan.wait(timeout=10) == -9
        assert kept.poll() is None
    finally:
        for process in (orphan, kept):
            process.kill()
            process.wait()


async def test_an_adapter_serve_evicts_leaves_the_engine_once():
    import asyncio

    from adapters.engine import AdapterHandle
    from server.engine.ray_replica import LoadedAdapter
    from tests.fakes import FakeEngine

    engine = FakeEngine()
    handle = AdapterHandle(7, "abc@7", "/nowhere", "abc")
    await engine.add_adapter(handle)
    loaded = {"abc": handle}
    adapter = LoadedAdapter(engine, handle, loaded)
    # Serve's multiplexer calls a synchronous __del__ from a worker thread when it evicts.
    await asyncio.get_running_loop().run_in_executor(None, adapter.__del__)
    await asyncio.sleep(0.05)
    assert engine.removed == [7] and 7 not in engine.cache and loaded == {}
    adapter.__del__()  # the garbage collector's call later changes nothing
    await asyncio.sleep(0.05)
    assert engine.removed == [7]

"""server.engine.wait: the vLLM plugin that makes the engine's processes sleep instead of spin."""

from __future__ import annotations

import time
from importlib.metadata import entry_points

import pytest

from server.engine import wait as engine_wait

pytestmark = pytest.mark.imports("vllm")  # in this process: see tests/conftest.py


class Condition:
    """The parts of vLLM's SpinCondition that the wait reads, with its original wait recorded."""

    def __init__(self, busy_loop_s: float = 1.0):
        self.last_read = time.monotonic()
        self.busy_loop_s = busy_loop_s
        self.blocked = 0
        self.reads = 0

    def original_wait(self, timeout_ms=None):
        self.blocked += 1

    def original_record_read(self):
        self.reads += 1
        self.last_read = time.monotonic()


@pytest.fixture
def calls(monkeypatch):
    seen: list[str] = []
    monkeypatch.setattr(engine_wait.os, "sched_yield", lambda: seen.append("yield"))
    monkeypatch.setattr(engine_wait.time, "sleep", lambda seconds: seen.append(f"sleep {seconds:g}"))
    return seen


def test_spins_then_sleeps_then_spins_again_after_a_read(calls):
    condition = Condition()
    wait = engine_wait.make_wait(Condition.original_wait, spin_s=0.05, nap_s=0.0002)
    record_read = engine_wait.make_record_read(Condition.original_record_read)
    wait(condition)
    assert calls == ["yield"]
    deadline = time.monotonic() + 0.06  # time.sleep is patched: wait on the clock
    while time.monotonic() < deadline:
        pass
    wait(condition)
    assert calls == ["yield", "sleep 0.0002"]
    record_read(condition)
    wait(condition)
    assert calls[-1] == "yield" and condition.reads == 1


def test_idle_readers_block_as_vllm_does(calls):
    condition = Condition(busy_loop_s=0.0)
    condition.last_read -= 1.0
    wait = engine_wait.make_wait(Condition.original_wait, spin_s=0.0, nap_s=0.0001)
    wait(condition, 5000)
    assert condition.blocked == 1 and calls == []


def test_settings_travel_as_microseconds():
    assert engine_wait.decode(engine_wait.encode(200, 50)) == (0.0002, 0.00005)
    with pytest.raises(ValueError):
        engine_wait.decode("-1:5")


def test_the_plugin_is_registered_with_vllm():
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("lora_gateway_engine_wait") == "server.engine.wait:register"


def test_register_patches_only_when_the_gateway_asks(monkeypatch):
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    original_wait, original_read = SpinCondition.wait, SpinCondition.record_read
    monkeypatch.setattr(SpinCondition, "wait", original_wait)
    monkeypatch.setattr(SpinCondition, "record_read", original_read)
    monkeypatch.setattr(SpinCondition, "_gateway_wait", None, raising=False)
    monkeypatch.delenv(engine_wait.ENV, raising=False)
    engine_wait.register()  # vLLM's own server: no variable, nothing changes
    assert SpinCondition.wait is original_wait
    monkeypatch.setenv(engine_wait.ENV, engine_wait.encode(200, 50))
    engine_wait.register()
    patched = SpinCondition.wait
    assert patched is not original_wait and SpinCondition.record_read is not original_read
    engine_wait.register()  # loaded twice in one process: not wrapped twice
    assert SpinCondition.wait is patched

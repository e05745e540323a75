"""How the engine's processes wait for each other: a vLLM general plugin.

vLLM's engine core and its worker hand every step to each other through a shared-memory queue.
A reader with nothing to read calls sched_yield in a loop for up to a second after its last read.
On a GPU server that keeps a spare core busy. On a small CPU host it does not come free: the
worker's spin holds its core, and the engine core's spin, while the worker computes a step,
takes turns on the other core with the HTTP server that feeds it. Measured on the benchmark's
2-core machine (docs/benchmarks.md): the engine spends about 45 % less CPU per request when a
reader spins briefly and then sleeps between looks, and the gateway serves more requests.

vLLM loads general plugins (entry point group `vllm.general_plugins`) in every process it starts,
vLLM's own server included. This one does nothing unless ENV names a wait, which only
`VllmEngine.start` sets, for the processes of its own engine.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

ENV = "LORA_GATEWAY_ENGINE_WAIT"  # "<spin µs>:<nap µs>"
SUPPORTED_VLLM = ("0.32.",)


def encode(spin_us: int, nap_us: int) -> str:
    return f"{spin_us}:{nap_us}"


def decode(value: str) -> tuple[float, float]:
    """Seconds to spin, then seconds to sleep between looks."""
    spin_us, nap_us = (int(part) for part in value.split(":"))
    if spin_us < 0 or nap_us < 0:
        raise ValueError("negative wait")
    return spin_us / 1e6, nap_us / 1e6


def make_wait(original: Any, spin_s: float, nap_s: float) -> Any:
    """SpinCondition.wait: inside vLLM's busy window, spin for spin_s, then sleep nap_s a look."""

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        now = time.monotonic()
        if now > self.last_read + self.busy_loop_s:
            original(self, timeout_ms)  # idle: vLLM blocks on its notify socket
            return
        started = getattr(self, "_gateway_wait_started", None)
        if started is None:
            self._gateway_wait_started = started = now
        if now - started < spin_s:
            os.sched_yield()
        else:
            time.sleep(nap_s)

    return wait


def make_record_read(original: Any) -> Any:
    def record_read(self: Any) -> None:
        self._gateway_wait_started = None
        original(self)

    return record_read


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    value = os.environ.get(ENV)
    if not value:
        return
    import vllm
    from vllm.distributed.device_communicators import shm_broadcast

    condition = getattr(shm_broadcast, "SpinCondition", None)
    if not vllm.__version__.startswith(SUPPORTED_VLLM) or condition is None:
        logger.warning("engine wait left as vLLM %s ships it (written for vLLM 0.32)", vllm.__version__)
        return
    if getattr(condition, "_gateway_wait", None) == value:
        return  # vLLM may load plugins more than once in a process
    spin_s, nap_s = decode(value)
    if nap_s == 0:
        return
    condition.wait = make_wait(condition.wait, spin_s, nap_s)
    condition.record_read = make_record_read(condition.record_read)
    condition._gateway_wait = value
    logger.info("engine wait: spin %.0f µs, then sleep %.0f µs between looks", spin_s * 1e6, nap_s * 1e6)

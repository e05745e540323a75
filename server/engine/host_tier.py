"""The engine's host tier of adapters: a vLLM general plugin, registered with lora_ops.py's.

vLLM's worker keeps at most --max-cpu-loras adapters ready (its LRU cache), and loads any other
from its folder inside the step that needs it: it reads the files, parses PEFT's config, checks
it against the LoRA config and builds the tensors (`WorkerLoRAManager._load_adapter`). With many
adapters in use that happens every few steps, and every request in the step waits for it.

This tier keeps the adapters that load built, up to ENV's byte budget, least recently used
dropped first: a load that finds its adapter here costs a dict copy, as vLLM's own `clone`
makes, and then the copy into a batch slot. An adapter's id never names other content (the
registry never reuses one), so the id is the key; `remove_lora` drops it. The files, the shared
folder and S3 stay behind it as the source.

Every adapter the registry registers passes through `add_lora` once, so the tier fills as
adapters are registered, before any request needs them.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Any

# Under "vllm", whose handler the engine's processes set up: a logger of our own has none there.
logger = logging.getLogger("vllm.lora_gateway.host_tier")

ENV = "LORA_GATEWAY_ADAPTER_CACHE_BYTES"  # the byte budget; unset or 0: no tier
SUPPORTED_VLLM = ("0.32.",)
REPORT_SECONDS = 30.0  # how often the tier logs its size and hit counts, when loads happen
REPORT_LOADS = 64  # and every so many loads


class HostTier:
    """Built adapters by id, bounded by bytes, least recently used first."""

    def __init__(self, budget: int):
        self.budget = budget
        self._held: OrderedDict[int, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._reported = 0.0
        self._first_hit_unreported = True

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, key: int) -> bool:
        return key in self._held

    def get(self, key: int) -> Any | None:
        found = self._held.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._held.move_to_end(key)
        return found[0]

    def put(self, key: int, value: Any, size: int) -> None:
        """Keep `value`, dropping the least recently used past the budget; one larger than the
        whole budget is not kept."""
        self.drop(key)
        if size > self.budget:
            return
        self._held[key] = (value, size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, dropped) = self._held.popitem(last=False)
            self.bytes -= dropped

    def drop(self, key: int) -> None:
        found = self._held.pop(key, None)
        if found is not None:
            self.bytes -= found[1]

    def report(self, now: float) -> None:
        """Log the tier's size and counts: at its first hit, every REPORT_LOADS loads, or REPORT_SECONDS."""
        first_hit = self.hits == 1 and self._first_hit_unreported
        if first_hit or (self.hits + self.misses) % REPORT_LOADS == 0 or now - self._reported >= REPORT_SECONDS:
            if first_hit:
                self._first_hit_unreported = False
            self._reported = now
            logger.info(
                "host tier: %d adapters, %d bytes, %d hits, %d misses", len(self), self.bytes, self.hits, self.misses
            )


def lora_bytes(lora: Any) -> int:
    """The bytes of a built adapter's tensors (vLLM's LoRAModel)."""
    total = 0
    for weights in [*lora.loras.values(), *lora.modules_to_save.values()]:
        for name in ("lora_a", "lora_b", "weight", "bias"):
            value = getattr(weights, name, None)
            for tensor in value if isinstance(value, list) else [value]:
                if tensor is not None and hasattr(tensor, "element_size"):
                    total += tensor.numel() * tensor.element_size()
    return total


def make_load_adapter(original: Any, tier: HostTier) -> Any:
    def _load_adapter(self: Any, lora_request: Any) -> Any:
        key = lora_request.lora_int_id
        lora = tier.get(key)
        if lora is None:
            lora = original(self, lora_request)
            tier.put(key, lora, lora_bytes(lora))
        tier.report(time.monotonic())
        # vLLM packs and scales the modules of what it gets in place: give it a copy of the module
        # dict (tensors shared); scaling folds into lora_b once and is then 1, so reuse is exact.
        return lora.clone(key)

    return _load_adapter


def make_remove_adapter(original: Any, tier: HostTier) -> Any:
    def remove_adapter(self: Any, adapter_id: int) -> bool:
        tier.drop(adapter_id)
        return original(self, adapter_id)

    return remove_adapter


def register() -> None:
    """Called by lora_ops.register in each of vLLM's processes."""
    budget = int(os.environ.get(ENV) or 0)
    if budget <= 0:
        return
    import vllm

    try:
        from vllm.lora.worker_manager import WorkerLoRAManager
    except ImportError:
        WorkerLoRAManager = None  # noqa: N806 - a class, or its absence
    if not vllm.__version__.startswith(SUPPORTED_VLLM) or WorkerLoRAManager is None:
        logger.warning("no host tier for adapters: written for vLLM 0.32, not %s", vllm.__version__)
        return
    if getattr(WorkerLoRAManager, "_gateway_host_tier", None) is not None:
        return  # vLLM may load plugins more than once in a process
    tier = HostTier(budget)
    WorkerLoRAManager._load_adapter = make_load_adapter(WorkerLoRAManager._load_adapter, tier)
    WorkerLoRAManager.remove_adapter = make_remove_adapter(WorkerLoRAManager.remove_adapter, tier)
    WorkerLoRAManager._gateway_host_tier = tier
    logger.info("host tier for adapters: up to %d bytes", budget)

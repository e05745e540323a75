"""What the gateway's vLLM plugins read in the engine's processes, which inherit the environment."""

from __future__ import annotations

from server.config import Settings
from server.engine import host_tier
from server.engine import lora_ops as engine_lora
from server.engine import wait as engine_wait


def plugin_env(settings: Settings) -> dict[str, str]:
    """The variables server/engine/wait.py, lora_ops.py and host_tier.py read at engine start."""
    return {
        engine_wait.ENV: engine_wait.encode(settings.engine_spin_us, settings.engine_nap_us),
        engine_lora.ENV: "1" if settings.lora_ops == "grouped" else "0",
        host_tier.ENV: str(settings.adapter_cache_bytes or 0),
    }

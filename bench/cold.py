"""From registering an adapter on a running server to its first generated token (a cold load).

The gateway registers through its admin API (`POST /v1/adapters {name, path}`), which loads the
adapter into the engine before it answers. vLLM's server takes `POST /v1/load_lora_adapter
{lora_name, lora_path}` (with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). Right after the answer, a
streamed chat request asks the new adapter the demo's question; its first chunk with text ends
the measurement.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.probe import messages


async def first_token_s(client: httpx.AsyncClient, model: str, started: float) -> float:
    """Seconds from `started` to the first streamed text of `model` (or to the end, if none)."""
    body = {"model": model, "messages": messages(), "max_tokens": 8, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        first = None
        async for line in response.aiter_lines():
            if first is not None or not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            payload = orjson.loads(line[5:])
            if "error" in payload:
                raise RuntimeError(f"{model}: stream error {payload['error']}")
            choices = payload.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter()
    return (first or time.perf_counter()) - started


async def cold_loads(url: str, adapters: dict[str, Path], *, vllm: bool, timeout: float = 120.0) -> dict[str, Any]:
    """Register each adapter, one at a time, and time it to its first token; medians over them."""
    runs = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        for name, path in adapters.items():
            started = time.perf_counter()
            if vllm:
                response = await client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
                ok = response.status_code == 200
            else:
                response = await client.post("/v1/adapters", json={"name": name, "path": str(path)})
                ok = response.status_code == 201
            if not ok:
                raise RuntimeError(f"registering {name}: HTTP {response.status_code}: {response.text[:300]}")
            registered = time.perf_counter()
            to_first = await first_token_s(client, name, started)
            runs.append(
                {
                    "name": name,
                    "register_s": round(registered - started, 4),
                    "to_first_token_s": round(to_first, 4),
                    "first_request_ttft_s": round(to_first - (registered - started), 4),
                }
            )
    return {
        "count": len(runs),
        "register_s_median": statistics.median(r["register_s"] for r in runs),
        "to_first_token_s_median": statistics.median(r["to_first_token_s"] for r in runs),
        "first_request_ttft_s_median": statistics.median(r["first_request_ttft_s"] for r in runs),
        "runs": runs,
    }

"""What routing a request to an adapter costs, with few or many adapters registered. No engine.

- registry: `Registry.resolve(name, tenant=None, admin=True)` plus entering and leaving
  `Registry.lease(entry)`, for adapters already resident, over tests.fakes.FakeEngine;
- http: a whole streamed `POST /v1/completions` (4 tokens) through `server.app.build_app` over
  FakeEngine, called with httpx's ASGITransport (no sockets), built as tests/conftest.py does.

Each size gets its own registry (or app) with N adapters registered in-process: registering
10,000 through the real gateway's admin API would load each one into the engine. Calls name
adapters that are resident. The sizes are timed in alternating batches, so a noisy neighbour
slows them alike, and each size reports the median over its batches of nanoseconds per call.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

RESIDENT = 7  # adapters kept resident and called; the base model's zero adapter takes one more slot

Call = Callable[[str], Awaitable[None]]


def adapter_names(count: int) -> list[str]:
    return [f"lora{i}" for i in range(count)]


def called_names(names: list[str]) -> list[str]:
    """RESIDENT names spread over the whole catalog, not just its first entries."""
    step = max(1, len(names) // RESIDENT)
    return names[::step][:RESIDENT]


@asynccontextmanager
async def registry_caller(entries: int) -> AsyncIterator[tuple[Call, list[str]]]:
    """resolve + lease enter/exit over a Registry with `entries` adapters registered."""
    from adapters.registry import Registry
    from adapters.spec import SHARED
    from tests.fakes import FakeEngine, fake_spec

    registry = Registry(
        FakeEngine(), base_name="base", base_adapter=fake_spec("__base__", 1), max_resident=RESIDENT + 1
    )
    await registry.start()
    for name in adapter_names(entries):
        await registry.register(SHARED, name, fake_spec(name))

    async def call(name: str) -> None:
        entry = registry.resolve(name, tenant=None, admin=True)
        async with registry.lease(entry):
            pass

    called = called_names(adapter_names(entries))
    for name in called:  # make them resident
        await call(name)
    if registry.resident_count != len(called):
        raise RuntimeError(f"routing benchmark: {registry.resident_count} adapters resident, expected {len(called)}")
    yield call, called


@asynccontextmanager
async def http_caller(entries: int) -> AsyncIterator[tuple[Call, list[str]]]:
    """A streamed 4-token completion through the whole app over FakeEngine and ASGITransport."""
    import httpx

    from adapters.database import Database
    from adapters.registry import Registry
    from adapters.spec import SHARED
    from server.app import build_app
    from server.config import Settings
    from tests.fakes import FakeEngine, fake_spec

    with tempfile.TemporaryDirectory(prefix="routing-") as scratch:
        state = Path(scratch)
        settings = Settings(served_model_name="base", state_dir=state, max_cpu_loras=RESIDENT + 2, max_loras=4)
        engine = FakeEngine(max_model_len=256)
        registry = Registry(
            engine,
            base_name="base",
            base_adapter=fake_spec("__base__", 1),
            max_resident=settings.max_cpu_loras - 1,
            catalog=Database(state / "catalog.sqlite3"),
        )
        app = build_app(settings, engine, registry)
        try:
            async with app.router.lifespan_context(app):
                for name in adapter_names(entries):
                    await registry.register(SHARED, name, fake_spec(name))
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:

                    async def call(name: str) -> None:
                        response = await client.post(
                            "/v1/completions",
                            json={
                                "model": name,
                                "prompt": "the world",
                                "max_tokens": 4,
                                "temperature": 0,
                                "stream": True,
                                "stream_options": {"include_usage": True},
                            },
                        )
                        if response.status_code != 200 or not response.text.endswith("data: [DONE]\n\n"):
                            raise RuntimeError(
                                f"routing benchmark: {name} answered {response.status_code}: {response.text[:200]}"
                            )

                    called = called_names(adapter_names(entries))
                    for name in called:  # make them resident, and warm up
                        await call(name)
                    yield call, called
        finally:
            registry.catalog.close()


CALLERS = {"registry": registry_caller, "http": http_caller}
DEFAULT_BATCHES = {"registry": (100, 500), "http": (40, 10)}  # (batches, calls per batch)
QUICK_BATCHES = {"registry": (6, 300), "http": (3, 10)}


async def compare_sizes(kind: str, sizes: list[int], batches: int, batch: int) -> dict[str, Any]:
    """Median ns per call at each size, timed in alternating batches; ratio of the last size to the first."""
    async with AsyncExitStack() as stack:
        callers = []
        for size in sizes:
            started = time.perf_counter()
            call, called = await stack.enter_async_context(CALLERS[kind](size))
            callers.append((size, call, [called[i % len(called)] for i in range(batch)], time.perf_counter() - started))
        timings: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(batches):
            for size, call, sequence, _setup in callers:
                started = time.perf_counter()
                for name in sequence:
                    await call(name)
                timings[size].append((time.perf_counter() - started) / batch * 1e9)
    runs = []
    for size, _call, _sequence, setup_s in callers:
        per_call = sorted(timings[size])
        runs.append(
            {
                "entries": size,
                "median_ns": round(statistics.median(per_call), 1),
                "min_ns": round(per_call[0], 1),
                "max_ns": round(per_call[-1], 1),
                "batches": batches,
                "calls_per_batch": batch,
                "setup_s": round(setup_s, 2),
            }
        )
    return {
        "runs": runs,
        "ratio": round(runs[-1]["median_ns"] / runs[0]["median_ns"], 3),
        "min_ratio": round(runs[-1]["min_ns"] / runs[0]["min_ns"], 3),
    }


async def measure(sizes: tuple[int, ...] = (10, 10_000), *, quick: bool = False) -> dict[str, Any]:
    """Both costs at every size; `ratio` is last size over first (1.0 is perfectly flat)."""
    plan = QUICK_BATCHES if quick else DEFAULT_BATCHES
    return {"sizes": list(sizes), **{kind: await compare_sizes(kind, list(sizes), *plan[kind]) for kind in CALLERS}}


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure()), indent=2))

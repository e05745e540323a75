"""What the Responses API costs over chat on the demo model: the same greedy answer asked both ways.

    python -m bench.responses --out bench/results/responses

It starts one gateway on the demo (`lora-gateway serve`, its defaults otherwise) and sends one
request at a time to the `pirate` adapter, `--max-tokens` tokens, greedy, so that every kind
generates the same tokens: a chat completion, a response not stored (`store: false`), a response
stored (OpenAI's default: one catalog count before, one insert after), and each of chat and
Responses streamed (to the stream's last byte). The kinds take turns for `--rounds` rounds; the
medians, and their ratio to chat's (streamed: to chat's streamed), are reported.

    python -m bench.responses --fake-engine

The gateway's own cost alone: the same kinds, in-process over the tests' FakeEngine (which answers
at once), `--rounds` × 10 each, so that the engine's time and the machine's load do not hide it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.structured import start_gateway

ADAPTER = "pirate"
QUESTION = "Who are you?"


def requests(max_tokens: int) -> dict[str, tuple[str, dict[str, Any]]]:
    chat = {"model": ADAPTER, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens}
    response = {"model": ADAPTER, "input": QUESTION, "max_output_tokens": max_tokens}
    greedy = {"temperature": 0}
    return {
        "chat": ("/v1/chat/completions", chat | greedy),
        "responses, store false": ("/v1/responses", response | greedy | {"store": False}),
        "responses, stored": ("/v1/responses", response | greedy),
        "chat, streamed": ("/v1/chat/completions", chat | greedy | {"stream": True}),
        "responses, streamed": ("/v1/responses", response | greedy | {"stream": True, "store": False}),
    }


async def timed(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with client.stream("POST", path, json=body) as response:
        async for _ in response.aiter_bytes():
            pass
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}")
    return time.perf_counter() - started


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await take_turns(client, requests(args.max_tokens), args.rounds)


async def measure_fake(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    """In-process, over the FakeEngine: only the gateway's own work is timed."""
    from adapters.database import Database
    from adapters.registry import Registry
    from adapters.spec import SHARED
    from server.app import build_app
    from server.config import Settings
    from tests.fakes import FakeEngine, fake_spec

    settings = Settings(served_model_name="base", max_cpu_loras=3, max_loras=2, state_dir=state)
    engine = FakeEngine(cache_size=3, max_model_len=4096)
    catalog = Database(state / "catalog.sqlite3")
    registry = Registry(
        engine, base_name="base", base_adapter=fake_spec("__base__", 1), max_resident=2, catalog=catalog
    )
    app = build_app(settings, engine, registry)
    async with app.router.lifespan_context(app):
        await registry.register(SHARED, ADAPTER, fake_spec(ADAPTER), load=True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            return await take_turns(client, requests(args.max_tokens), args.rounds * 10)


async def take_turns(client: httpx.AsyncClient, kinds: dict[str, tuple[str, dict[str, Any]]], rounds: int):
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    for path, body in kinds.values():  # the adapter loaded, each path warm
        await timed(client, path, body)
    for _ in range(rounds):
        for kind, (path, body) in kinds.items():
            seconds[kind].append(await timed(client, path, body))
    medians = {kind: statistics.median(values) * 1000 for kind, values in seconds.items()}
    return {
        "median_ms": medians,
        "ratio": {
            kind: medians[kind] / medians["chat, streamed" if "streamed" in kind else "chat"] for kind in medians
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/responses"), help="folder for results.json")
    parser.add_argument("--demo-dir", type=Path, default=Path.home() / ".cache" / "lora-gateway" / "demo",
                        help="where the demo is built once and reused")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=40, help="requests of each kind, taking turns")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens each request generates (greedy)")
    parser.add_argument("--fake-engine", action="store_true", help="time the gateway alone, over the FakeEngine")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-responses-") as state:
        if args.fake_engine:
            results = asyncio.run(measure_fake(args, Path(state)))
            args.out = args.out / "fake-engine"
            args.out.mkdir(exist_ok=True)
        else:
            results = run_gateway(args, Path(state))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results["run"] = {"commit": commit, "args": {k: str(v) for k, v in vars(args).items()}, "at": time.time()}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def run_gateway(args: argparse.Namespace, state: Path) -> dict[str, Any]:
    process, url = start_gateway(args.demo_dir, state, args.out / "gateway.log")
    try:
        return asyncio.run(measure(url, args))
    finally:
        os.killpg(process.pid, 15)
        process.wait(timeout=120)


if __name__ == "__main__":
    main()

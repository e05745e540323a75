"""What the Responses API costs over chat on the demo model: the same greedy answer asked both ways.

    python -m bench.responses --out bench/results/responses

It starts one gateway on the demo (`lora-gateway serve`, its defaults otherwise) and sends one
request at a time to the `pirate` adapter, `--max-tokens` tokens, greedy, so that every kind
generates the same tokens: a chat completion, a response not stored (`store: false`), a response
stored (OpenAI's default: one catalog count before, one insert after), and each of chat and
Responses streamed (to the stream's last byte). The kinds take turns for `--rounds` rounds; the
medians, and their ratio to chat's (streamed: to chat's streamed), are reported.
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
    kinds = requests(args.max_tokens)
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for path, body in kinds.values():  # the adapter loaded, each path warm
            await timed(client, path, body)
        for _ in range(args.rounds):
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
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-responses-") as state:
        process, url = start_gateway(args.demo_dir, Path(state), args.out / "gateway.log")
        try:
            results = asyncio.run(measure(url, args))
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=120)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results["run"] = {"commit": commit, "args": {k: str(v) for k, v in vars(args).items()}, "at": time.time()}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

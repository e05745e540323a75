"""What structured outputs cost on the demo model: grammar compile time, first and cached, and the
throughput of a JSON-schema request mix against plain requests.

    python -m bench.structured --out bench/results/structured

It starts one gateway on the demo (`lora-gateway serve`, its defaults otherwise) and measures:
- **compile**: a chat request of one token on an adapter, with a JSON schema the gateway and the
  engine have never seen (a fresh property name each time), then the same request again (the
  gateway's verdict and the engine's compiled grammar are cached), and the same request with no
  schema; medians over `--schemas` schemas. First minus plain is what compiling costs a request.
- **throughput**: `--concurrency` clients send chat requests of `--max-tokens` tokens each for
  `--seconds` each round; a round is plain, half with a JSON schema (cached), or all with one. Every
  request runs to max_tokens (plain ones with ignore_eos; the schema asks for a longer string), so
  the grammar masks every step. The mixes take turns for `--rounds` rounds; the medians of
  generated tokens per second, and their ratio to plain, are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.servers import free_port

ADAPTER = "pirate"
QUESTION = "Who are you?"
MIXES = {"plain": 0.0, "half JSON schema": 0.5, "all JSON schema": 1.0}


def schema(field: str = "name") -> dict[str, Any]:
    """A schema whose output ends: bounded strings and numbers, an enum, a boolean."""
    return {
        "type": "object",
        "properties": {
            "mood": {"enum": ["calm", "angry", "merry"]},
            field: {"type": "string", "maxLength": 24},
            "crew": {"type": "integer", "minimum": 0, "maximum": 999},
            "aboard": {"type": "boolean"},
            "ship": {"type": "string", "maxLength": 24},
        },
        "required": ["mood", field, "crew", "aboard", "ship"],
        "additionalProperties": False,
    }


# For throughput: a JSON string longer than any request's max_tokens, so that the grammar masks
# every step of a constrained request, as plain ones (ignore_eos) run to max_tokens too.
LONG = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"]}


def body(max_tokens: int, constrained: dict[str, Any] | None, *, full_length: bool = False) -> dict[str, Any]:
    request = {
        "model": ADAPTER,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": full_length,
    }
    if constrained is not None:
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": constrained}}
    return request


async def timed(client: httpx.AsyncClient, request: dict[str, Any]) -> tuple[float, int]:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=request)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]


async def compile_times(client: httpx.AsyncClient, schemas: int) -> dict[str, Any]:
    first, cached, plain = [], [], []
    for _ in range(schemas):
        fresh = schema(f"name_{uuid.uuid4().hex[:12]}")
        first.append((await timed(client, body(1, fresh)))[0])
        cached.append((await timed(client, body(1, fresh)))[0])
        plain.append((await timed(client, body(1, None)))[0])
    medians = {name: statistics.median(values) for name, values in (("first", first), ("cached", cached),
                                                                     ("plain", plain))}  # fmt: skip
    return {
        "schemas": schemas,
        "first_request_ms_median": round(medians["first"] * 1000, 1),
        "cached_request_ms_median": round(medians["cached"] * 1000, 1),
        "plain_request_ms_median": round(medians["plain"] * 1000, 1),
        "compile_ms_median": round((medians["first"] - medians["plain"]) * 1000, 1),
        "cached_overhead_ms_median": round((medians["cached"] - medians["plain"]) * 1000, 1),
    }


async def one_round(client: httpx.AsyncClient, share: float, concurrency: int, seconds: float, max_tokens: int):
    tokens = requests = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal tokens, requests
        sent = 0
        while time.perf_counter() < deadline:
            # Each client alternates by its own count, so that the share holds at any concurrency.
            use = share >= 1.0 or (share > 0 and (index + sent) % round(1 / share) == 0)
            _, count = await timed(client, body(max_tokens, LONG if use else None, full_length=True))
            tokens, requests, sent = tokens + count, requests + 1, sent + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    return tokens / elapsed, requests / elapsed


async def throughput(client: httpx.AsyncClient, args: argparse.Namespace) -> dict[str, Any]:
    await one_round(client, 1.0, args.concurrency, 3, args.max_tokens)  # warm-up, and the schema compiled
    per_mix: dict[str, list[tuple[float, float]]] = {mix: [] for mix in MIXES}
    for _ in range(args.rounds):
        for mix, share in MIXES.items():
            per_mix[mix].append(await one_round(client, share, args.concurrency, args.seconds, args.max_tokens))
    plain = statistics.median(t for t, _ in per_mix["plain"])
    return {
        mix: {
            "tokens_per_s_median": round(statistics.median(t for t, _ in runs), 1),
            "requests_per_s_median": round(statistics.median(r for _, r in runs), 2),
            "ratio_to_plain": round(statistics.median(t for t, _ in runs) / plain, 3),
        }
        for mix, runs in per_mix.items()
    }


def start_gateway(demo_dir: Path, state_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "server", "serve", "--demo-dir", str(demo_dir), "--state-dir", str(state_dir),
            "--port", str(port), "--kv-cache-fraction", "0.05", "--log-format", "text"]  # fmt: skip
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited; see {log}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"the gateway was not ready in 600 s; see {log}")


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await timed(client, body(4, None))  # the adapter loaded
        return {"compile": await compile_times(client, args.schemas), "throughput": await throughput(client, args)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/structured"), help="folder for results.json")
    parser.add_argument("--demo-dir", type=Path, default=Path.home() / ".cache" / "lora-gateway" / "demo",
                        help="where the demo is built once and reused")  # fmt: skip
    parser.add_argument("--schemas", type=int, default=7, help="fresh schemas timed for the compile medians")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each mix for the throughput medians")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one throughput round")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending at once in a throughput round")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of each throughput request")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-structured-") as state:
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

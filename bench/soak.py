"""A bounded soak: mixed traffic and admin churn against a gateway serving the demo, with every
answer checked against the demo's known answers.

    .venv/bin/python -m bench.soak --duration 300            # starts its own gateway
    .venv/bin/python -m bench.soak --url http://127.0.0.1:8000 --pid PID --duration 300

Prints one JSON object: requests, errors by kind, wrong outputs, and the gateway's memory (RSS of
the process and its engine processes) at start and end. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from adapters.demo import BASE_ANSWER, DEMO_PROMPT, ensure_demo


def rss_mib(pid: int) -> float:
    process = psutil.Process(pid)
    processes = [process, *process.children(recursive=True)]
    return round(sum(p.memory_info().rss for p in processes if p.is_running()) / 2**20, 1)


async def soak(url: str, pid: int | None, demo_root: Path, duration: float, concurrency: int, seed: int) -> dict:
    demo = ensure_demo(demo_root)
    expected = {"demo": BASE_ANSWER, **demo.answers}
    rng = random.Random(seed)
    counts: Counter[str] = Counter()
    wrong: list[str] = []
    churn_answer: dict[str, str | None] = {"current": None}
    deadline = time.monotonic() + duration
    started_rss = rss_mib(pid) if pid else None

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(model: str, stream: bool) -> None:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": DEMO_PROMPT}],
                "temperature": 0,
                "max_tokens": 24,
                "stream": stream,
            }
            try:
                if stream:
                    text, status = [], 0
                    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        status = response.status_code
                        async for line in response.aiter_lines():
                            if line.startswith("data: {"):
                                chunk = json.loads(line[6:])
                                if "error" in chunk:
                                    status = 599
                                for choice in chunk.get("choices", []):
                                    text.append(choice["delta"].get("content") or "")
                    answer = "".join(text)
                else:
                    response = await client.post("/v1/chat/completions", json=body)
                    status = response.status_code
                    answer = response.json()["choices"][0]["message"]["content"] if status == 200 else ""
            except httpx.HTTPError as exc:
                counts[f"error:{type(exc).__name__}"] += 1
                return
            counts["requests"] += 1
            if status != 200:
                counts[f"status:{status}" + (":churn" if model == "churn" else "")] += 1
                return
            want = churn_answer["current"] if model == "churn" else expected[model]
            if model == "churn" and answer in demo.answers.values():
                return  # a replace may land mid-request: either version's answer is right
            if answer != want:
                wrong.append(f"{model}: {answer!r} != {want!r}")

        async def worker() -> None:
            while time.monotonic() < deadline:
                model = rng.choice(["demo", "pirate", "poet", "pirate", "poet", "churn"])
                await one(model, stream=rng.random() < 0.5)

        async def admin() -> None:
            while time.monotonic() < deadline:
                source = rng.choice(["pirate", "poet"])
                response = await client.post("/v1/adapters", json={"name": "churn", "path": str(demo.adapters[source])})
                counts[f"admin:register:{response.status_code}"] += 1
                churn_answer["current"] = demo.answers[source]
                await asyncio.sleep(rng.uniform(0.5, 2))
                if rng.random() < 0.3:
                    churn_answer["current"] = None
                    response = await client.delete("/v1/adapters/churn")
                    counts[f"admin:delete:{response.status_code}"] += 1
                    await asyncio.sleep(rng.uniform(0.2, 1))

        began = time.monotonic()
        await asyncio.gather(admin(), *(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - began
        leftover = [a for a in (await client.get("/v1/adapters")).json()["data"] if a["in_flight"]]
    return {
        "duration_s": round(elapsed, 1),
        "concurrency": concurrency,
        "requests": counts.pop("requests", 0),
        "counts": dict(sorted(counts.items())),
        "wrong_outputs": len(wrong),
        "wrong_examples": wrong[:5],
        "adapters_with_requests_left_in_flight": len(leftover),
        "rss_mib_start": started_rss,
        "rss_mib_end": rss_mib(pid) if pid else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running gateway serving the demo (default: start one)")
    parser.add_argument("--pid", type=int, help="that gateway's process id, to measure its memory")
    parser.add_argument("--duration", type=float, default=300, help="seconds of traffic (default 300)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the traffic mix")
    parser.add_argument(
        "--demo-dir",
        type=Path,
        default=Path.home() / ".cache" / "lora-gateway" / "demo",
        help="the demo build to use (built if missing)",
    )
    args = parser.parse_args()
    process = None
    url, pid = args.url, args.pid
    if url is None:
        state = tempfile.mkdtemp(prefix="soak-")
        port = 8790
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "serve",
                "--port",
                str(port),
                "--demo-dir",
                str(args.demo_dir),
                "--state-dir",
                state,
                "--max-cpu-loras",
                "4",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url, pid = f"http://127.0.0.1:{port}", process.pid
        for _ in range(600):
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    try:
        result = asyncio.run(soak(url, pid, args.demo_dir, args.duration, args.concurrency, args.seed))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=120)
    print(json.dumps(result, indent=2))
    return 0 if result["wrong_outputs"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

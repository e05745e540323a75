"""Fair scheduling under a flood: one gateway (the demo, --max-num-seqs 16), two tenants, rounds
that alternate the fair policy and first come, first served (PATCH /v1/scheduling).

    .venv/bin/python -m bench.fairness                     # 2 rounds of each policy
    .venv/bin/python -m bench.fairness --rounds 1 --phase-seconds 10 --plot docs/plots/fairness.svg

Every request asks for 32 tokens with ignore_eos; each tenant runs closed loops (a client sends
its next request when its last one is answered). Phases of each round:
- alone: B keeps 4 requests in flight, A none: B's latency alone;
- full: B keeps 16 in flight (a full batch), A none: the engine's own latency at a full batch,
  the least B can see under a flood whatever the scheduler does;
- flood: A keeps 128 in flight, B 4: B's latency under the flood, and the total throughput;
- equal: both keep 64 in flight, weights 1 and 1: their token shares;
- weighted: both keep 64 in flight, A's weight 2: their token shares.
Prints one JSON object (medians over the rounds of each policy, and the ratios the targets in
docs/benchmarks.md name) and writes a plot with --plot. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import httpx

from adapters.demo import ensure_demo
from bench.servers import Launched, ProcessPool, free_port, wait_ready

ADMIN_KEY = "bench-fairness-admin-key-0123456789abcdef"
TOKENS = 32
WARMUP_SECONDS = 3.0  # a phase's first seconds, while the loops fill the engine, are not counted


class Phase:
    """What the loops of one phase saw: per tenant, latencies and tokens of requests ended in the window."""

    def __init__(self, start: float, end: float):
        self.start, self.end = start, end
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.tokens: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.waits: dict[str, float] = {}  # mean wait in the gateway's queue, from its metrics

    def record(self, tenant: str, began: float, ended: float, tokens: int) -> None:
        if self.start <= ended <= self.end:
            self.tokens[tenant] += tokens
            if began >= self.start:
                self.latencies[tenant].append(ended - began)

    def p50(self, tenant: str) -> float | None:
        values = self.latencies.get(tenant)
        return round(statistics.median(values), 3) if values else None

    def share(self, tenant: str) -> float | None:
        total = sum(self.tokens.values())
        return round(self.tokens[tenant] / total, 4) if total else None

    def throughput(self) -> float:
        return round(sum(self.tokens.values()) / (self.end - self.start), 1)


def queue_waits(scrape: str) -> dict[str, tuple[float, float]]:
    """Each tenant's (sum, count) of lora_gateway_tenant_queue_wait_seconds."""
    found: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in scrape.splitlines():
        for index, suffix in enumerate(("_sum{", "_count{")):
            if line.startswith("lora_gateway_tenant_queue_wait_seconds" + suffix):
                found[line.split('"')[1]][index] = float(line.split()[-1])
    return {tenant: (total, count) for tenant, (total, count) in found.items()}


async def run_phase(
    url: str, admin: httpx.AsyncClient, keys: dict[str, str], loops: dict[str, int], seconds: float
) -> Phase:
    before = queue_waits((await admin.get("/metrics")).text)
    began = time.monotonic()
    phase = Phase(began + WARMUP_SECONDS, began + WARMUP_SECONDS + seconds)
    # aiohttp, one session (connection pool) per tenant, as separate clients would have: httpx's pool
    # costs the client more CPU than the gateway at these concurrencies.
    sessions = {
        tenant: aiohttp.ClientSession(
            url,
            connector=aiohttp.TCPConnector(limit=count + 4),
            timeout=aiohttp.ClientTimeout(total=300),
            headers={"Authorization": f"Bearer {keys[tenant]}"},
        )
        for tenant, count in loops.items()
    }
    body = {"model": "demo", "prompt": "Tell me a story", "max_tokens": TOKENS, "ignore_eos": True}

    async def loop(tenant: str) -> None:
        while time.monotonic() < phase.end:
            sent = time.monotonic()
            async with sessions[tenant].post("/v1/completions", json=body) as response:
                answer = await response.json()
            if response.status != 200:
                phase.errors[f"{tenant}:{response.status}"] += 1
                await asyncio.sleep(0.1)
                continue
            phase.record(tenant, sent, time.monotonic(), answer["usage"]["completion_tokens"])

    try:
        tasks = [asyncio.create_task(loop(t)) for t, n in loops.items() for _ in range(n)]
        await asyncio.sleep(phase.end - time.monotonic())
        for task in tasks:  # the loops still waiting leave: their requests are aborted
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for session in sessions.values():
            await session.close()
    after = queue_waits((await admin.get("/metrics")).text)
    for tenant in loops:
        total, count = after.get(tenant, (0.0, 0.0))
        total_before, count_before = before.get(tenant, (0.0, 0.0))
        if count > count_before:
            phase.waits[tenant] = round((total - total_before) / (count - count_before), 3)
    return phase


async def settle(admin: httpx.AsyncClient) -> None:
    """Wait for the engine to empty between phases (aborted requests leave within a step or two)."""
    for _ in range(600):
        state = (await admin.get("/v1/scheduling")).json()
        if state["in_flight"] == 0 and state["waiting"] == 0:
            return
        await asyncio.sleep(0.1)


async def measure(url: str, rounds: int, seconds: float) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as admin:
        keys = {}
        for tenant in ("a", "b"):
            limits = {"max_concurrent": 1024, "requests_per_second": 100000}
            response = await admin.post("/v1/tenants", json={"name": tenant, "limits": limits})
            response.raise_for_status()
            keys[tenant] = response.json()["api_key"]
        runs: dict[str, list[dict]] = {"fair": [], "fcfs": []}
        for index in range(rounds * 2):
            policy = ("fair", "fcfs")[index % 2]
            (await admin.patch("/v1/scheduling", json={"policy": policy})).raise_for_status()
            result: dict = {"policy": policy}
            for name, loops, weight_a in (
                ("alone", {"b": 4}, 1),
                ("full", {"b": 16}, 1),
                ("flood", {"a": 128, "b": 4}, 1),
                ("equal", {"a": 64, "b": 64}, 1),
                ("weighted", {"a": 64, "b": 64}, 2),
            ):
                (await admin.patch("/v1/tenants/a", json={"limits": {"weight": weight_a}})).raise_for_status()
                await settle(admin)
                phase = await run_phase(url, admin, keys, loops, seconds)
                result[name] = {
                    "p50_s": {t: phase.p50(t) for t in loops},
                    "mean_queue_wait_s": phase.waits,
                    "share": {t: phase.share(t) for t in loops},
                    "tokens_per_s": phase.throughput(),
                    "errors": dict(phase.errors),
                }
            print(json.dumps(result), file=sys.stderr, flush=True)
            runs[policy].append(result)
    return summarize(runs)


def summarize(runs: dict[str, list[dict]]) -> dict:
    def median(policy: str, *path: str) -> float | None:
        values = []
        for run in runs[policy]:
            value = run
            for step in path:
                value = value[step]
            if value is not None:  # None: no request of that tenant completed in that phase
                values.append(value)
        return round(statistics.median(values), 4) if values else None

    summary: dict = {"rounds": runs}
    for policy in runs:
        alone = median(policy, "alone", "p50_s", "b")
        flooded = median(policy, "flood", "p50_s", "b")
        summary[policy] = {
            "b_p50_alone_s": alone,
            "b_p50_flood_s": flooded,
            "b_p50_ratio": round(flooded / alone, 2),
            "b_p50_full_batch_s": median(policy, "full", "p50_s", "b"),
            "b_p50_flood_over_full_batch": round(flooded / median(policy, "full", "p50_s", "b"), 2),
            "a_p50_flood_s": median(policy, "flood", "p50_s", "a"),
            "b_p50_equal_s": median(policy, "equal", "p50_s", "b"),
            "b_mean_queue_wait_flood_s": median(policy, "flood", "mean_queue_wait_s", "b"),
            "a_mean_queue_wait_flood_s": median(policy, "flood", "mean_queue_wait_s", "a"),
            "flood_tokens_per_s": median(policy, "flood", "tokens_per_s"),
            "equal_share_a": median(policy, "equal", "share", "a"),
            "weighted_share_ratio_a_to_b": round(
                median(policy, "weighted", "share", "a") / median(policy, "weighted", "share", "b"), 3
            ),
            "equal_tokens_per_s": median(policy, "equal", "tokens_per_s"),
        }
    fair, first = summary["fair"], summary["fcfs"]
    summary["targets"] = {
        "b_p50_flood_over_alone_fair (<= 1.5)": fair["b_p50_ratio"],
        "b_p50_flood_over_alone_fcfs": first["b_p50_ratio"],
        "b_p50_flood_over_full_batch_fair": fair["b_p50_flood_over_full_batch"],
        "b_p50_flood_over_full_batch_fcfs": first["b_p50_flood_over_full_batch"],
        "equal_share_a_over_b_fair (0.9 to 1.1)": round(fair["equal_share_a"] / (1 - fair["equal_share_a"]), 3),
        "weighted_share_a_over_b_fair (1.8 to 2.2)": fair["weighted_share_ratio_a_to_b"],
        "flood_throughput_fair_over_fcfs (>= 0.95)": round(fair["flood_tokens_per_s"] / first["flood_tokens_per_s"], 3),
        "equal_throughput_fair_over_fcfs (>= 0.95)": round(fair["equal_tokens_per_s"] / first["equal_tokens_per_s"], 3),
    }
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fair, first = summary["fair"], summary["fcfs"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = ["B alone (4)", "B alone (16)", "B + A's flood"]
    width = 0.38
    for offset, policy in enumerate(("fair", "fcfs")):
        values = [summary[policy][k] for k in ("b_p50_alone_s", "b_p50_full_batch_s", "b_p50_flood_s")]
        left.bar([i + offset * width for i in range(3)], values, width, label=policy)
    left.set_xticks([i + width / 2 for i in range(3)], labels)
    left.set_ylabel("B's p50 latency (s)")
    left.legend()
    shares = [fair["equal_share_a"], first["equal_share_a"]]
    weighted = [fair["weighted_share_ratio_a_to_b"], first["weighted_share_ratio_a_to_b"]]
    right.bar([0, 1], [s / (1 - s) for s in shares], width, label="weights 1:1")
    right.bar([width, 1 + width], weighted, width, label="weights 2:1")
    right.axhline(1, color="grey", lw=0.5)
    right.axhline(2, color="grey", lw=0.5)
    right.set_xticks([width / 2, 1 + width / 2], ["fair", "fcfs"])
    right.set_ylabel("A's tokens / B's, both backlogged")
    right.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def start_gateway(pool: ProcessPool, demo_dir: Path, state: Path, max_num_seqs: int, depth: int | None) -> Launched:
    port = free_port()
    argv = [
        sys.executable, "-m", "server", "serve", "--port", str(port), "--demo-dir", str(demo_dir),
        "--state-dir", str(state), "--admin-key", ADMIN_KEY, "--max-num-seqs", str(max_num_seqs),
        "--max-in-flight", "1024", "--kv-cache-fraction", "0.05", "--log-level", "warning",
    ]  # fmt: skip
    if depth is not None:
        argv += ["--fair-queue-depth", str(depth)]
    launched = pool.start("gateway", argv, state / "gateway.log", url=f"http://127.0.0.1:{port}")
    wait_ready(launched, "/ready", 600)
    return launched


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each policy, alternating (default 2)")
    parser.add_argument("--phase-seconds", type=float, default=20, help="measured seconds of each phase (default 20)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the engine's batch (default 16)")
    parser.add_argument("--fair-queue-depth", type=int, help="the gateway's --fair-queue-depth (default its own)")
    parser.add_argument("--plot", type=Path, help="write a plot (SVG or PNG, by the suffix) here")
    parser.add_argument(
        "--demo-dir", type=Path, default=Path.home() / ".cache" / "lora-gateway" / "demo", help="the demo build"
    )
    args = parser.parse_args()
    ensure_demo(args.demo_dir)
    pool = ProcessPool()
    state = Path(tempfile.mkdtemp(prefix="bench-fairness-"))
    try:
        gateway = start_gateway(pool, args.demo_dir, state, args.max_num_seqs, args.fair_queue_depth)
        load = os.getloadavg()
        summary = asyncio.run(measure(gateway.url, args.rounds, args.phase_seconds))
        summary["conditions"] = {
            "cpus": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "max_num_seqs": args.max_num_seqs,
            "phase_seconds": args.phase_seconds,
            "fair_queue_depth": args.fair_queue_depth or args.max_num_seqs * 3 // 2,
        }
    finally:
        pool.stop_all()
    if args.plot:
        plot(summary, args.plot)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

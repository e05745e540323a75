"""Interactive latency with and without a batch running beside it, on one gateway; and that the batch finishes.

    python -m bench.batches --rounds 3 --requests 120 --rate 3 --batch-lines 300 --out bench/results/batches

One gateway serves the demo; the rounds alternate "idle" (interactive load only) and "batch" (a
batch of --batch-lines completions created just before the same load). Each round's load is an
open loop of streamed completions (Poisson arrivals at --rate per second) over the base model and
both demo adapters, each answer --output-tokens long. After a "batch" round's load the batch is
left to finish, and the report gives how many of its lines were done during the load and how long
it took in all. The report gives each condition's median over rounds and the ratio of the medians
(batch over idle).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.loadgen import LoadConfig, run_load, summarize
from bench.replicas import write_report
from bench.servers import VENV_BIN, ProcessPool, free_port, wait_ready

FINISH_SECONDS = 1800


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.batches", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="load runs per condition, alternating (default 3)")
    parser.add_argument("--requests", type=int, default=120, help="interactive requests per run (default 120)")
    parser.add_argument("--rate", type=float, default=3.0, help="interactive requests per second (default 3)")
    parser.add_argument("--output-tokens", default="32", help="tokens per interactive answer (default 32)")
    parser.add_argument("--batch-lines", type=int, default=300, help="lines of each round's batch (default 300)")
    parser.add_argument("--batch-tokens", type=int, default=32, help="tokens per batch line's answer (default 32)")
    parser.add_argument(
        "--batch-lines-in-flight",
        type=int,
        default=None,
        help="the gateway's --batch-lines-in-flight (default: its own)",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and the server's log")
    return parser


def start_batch(client: httpx.Client, lines: int, tokens: int) -> str:
    models = ("demo", "pirate", "poet")
    rows = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": models[i % 3],
                "prompt": f"Line {i}: the ship",
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(lines)
    ]
    raw = "".join(json.dumps(row) + "\n" for row in rows).encode()
    file_id = client.post("/v1/files", files={"file": ("batch.jsonl", raw)}, data={"purpose": "batch"}).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    return client.post("/v1/batches", json=body).json()["id"]


def wait_finished(client: httpx.Client, batch_id: str) -> dict:
    deadline = time.monotonic() + FINISH_SECONDS
    while time.monotonic() < deadline:
        batch = client.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(1)
    return client.get(f"/v1/batches/{batch_id}").json()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="batches-"))
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(VENV_BIN / "lora-gateway"), "serve", "--port", str(port), "--state-dir", str(out / "state")]
    if args.batch_lines_in_flight is not None:
        argv += ["--batch-lines-in-flight", str(args.batch_lines_in_flight)]
        argv += ["--batch-lines-per-batch", str(args.batch_lines_in_flight)]
    pool = ProcessPool()
    results: dict[str, list[dict]] = {"idle": [], "batch": []}
    try:
        process = pool.start("gateway", argv, out / "gateway.log", url=url)
        print(f"ready in {wait_ready(process, '/ready', 600):.0f} s", file=sys.stderr)
        client = httpx.Client(base_url=url, timeout=60)
        for round_index in range(args.rounds):
            for condition in ("idle", "batch"):
                batch_id = start_batch(client, args.batch_lines, args.batch_tokens) if condition == "batch" else None
                started = time.monotonic()
                config = LoadConfig(
                    url=url,
                    models=["demo", "pirate", "poet"],
                    zipf_alpha=0.0,
                    rate=args.rate,
                    requests=args.requests,
                    warmup=3,
                    prompt_tokens="16",
                    output_tokens=args.output_tokens,
                    seed=round_index,
                    label=condition,
                    extra_body={"ignore_eos": True},  # every answer is --output-tokens long
                )
                summary = summarize(asyncio.run(run_load(config)).records)
                if batch_id is not None:
                    during = client.get(f"/v1/batches/{batch_id}").json()["request_counts"]
                    summary["batch_lines_done_during_load"] = during["completed"] + during["failed"]
                    finished = wait_finished(client, batch_id)
                    summary["batch_status"] = finished["status"]
                    summary["batch_request_counts"] = finished["request_counts"]
                    summary["batch_seconds"] = round(time.monotonic() - started, 1)
                results[condition].append(summary)
                print(
                    f"round {round_index + 1} {condition}: p99 {summary['latency_p99_ms']} ms, "
                    f"p50 {summary['latency_p50_ms']} ms"
                    + (
                        f", batch {summary['batch_status']} ({summary['batch_lines_done_during_load']} lines "
                        f"during the load, {summary['batch_seconds']} s in all)"
                        if batch_id
                        else ""
                    ),
                    file=sys.stderr,
                )
    finally:
        pool.stop_all()
    write_report(out, vars(args) | {"out": str(out)}, results, "batch", "idle")
    return 0


if __name__ == "__main__":
    sys.exit(main())

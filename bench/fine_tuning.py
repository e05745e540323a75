"""Serving latency with and without a fine-tuning job running beside it, on one gateway.

    python -m bench.fine_tuning --rounds 3 --requests 200 --concurrency 4 --out bench/results/fine-tuning

One gateway serves the demo; the rounds alternate "idle" (nothing else running) and "training"
(a fine-tuning job of the demo base in its worker process, started before the load and cancelled
after it). Each round is one closed-loop load of streamed completions over the base model and
both demo adapters, each answer --output-tokens long. The report gives each condition's median over rounds and the ratio of the
medians (training over idle).
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

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Question {i}: where is the ship?"},
            {"role": "assistant", "content": "The ship sailed at dawn with the tide."},
        ]
    }  # fmt: skip
    for i in range(200)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.fine_tuning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="load runs per condition, alternating (default 3)")
    parser.add_argument("--requests", type=int, default=200, help="requests per run (default 200)")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop workers (default 4)")
    parser.add_argument("--output-tokens", default="32", help="tokens per answer (default 32)")
    parser.add_argument("--training-threads", type=int, default=1, help="the gateway's --training-threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and the server's log")
    return parser


def start_job(url: str) -> str:
    """A job long enough to outlast one load run; returns its id once its worker is training."""
    raw = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
    with httpx.Client(base_url=url, timeout=60) as client:
        file_id = client.post("/v1/files", files={"file": ("bench.jsonl", raw)}, data={"purpose": "fine-tune"}).json()[
            "id"
        ]
        job = client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "demo", "training_file": file_id, "hyperparameters": {"n_epochs": 50}},
        ).json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 5}).json()["data"]
            if any(event["type"] == "metrics" for event in events):
                return job["id"]
            time.sleep(0.5)
    raise RuntimeError("the fine-tuning job did not start training within 120 s")


def stop_job(url: str, job_id: str) -> str:
    with httpx.Client(base_url=url, timeout=60) as client:
        status = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
        if status == "running":
            status = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"]
        return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fine-tuning-"))
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        str(VENV_BIN / "lora-gateway"),
        "serve",
        "--port",
        str(port),
        "--state-dir",
        str(out / "state"),
        "--training-threads",
        str(args.training_threads),
    ]
    pool = ProcessPool()
    results: dict[str, list[dict]] = {"idle": [], "training": []}
    try:
        process = pool.start("gateway", argv, out / "gateway.log", url=url)
        print(f"ready in {wait_ready(process, '/ready', 600):.0f} s", file=sys.stderr)
        for round_index in range(args.rounds):
            for condition in ("idle", "training"):
                job_id = start_job(url) if condition == "training" else None
                config = LoadConfig(
                    url=url,
                    models=["demo", "pirate", "poet"],
                    zipf_alpha=0.0,
                    concurrency=args.concurrency,
                    requests=args.requests,
                    warmup=args.concurrency,
                    prompt_tokens="16",
                    output_tokens=args.output_tokens,
                    seed=round_index,
                    label=condition,
                    extra_body={"ignore_eos": True},  # every answer is --output-tokens long
                )
                summary = summarize(asyncio.run(run_load(config)).records)
                if job_id is not None:
                    summary["job_status_after_load"] = stop_job(url, job_id)
                results[condition].append(summary)
                print(
                    f"round {round_index + 1} {condition}: p99 {summary['latency_p99_ms']} ms, "
                    f"{summary['req_per_s']} req/s",
                    file=sys.stderr,
                )
    finally:
        pool.stop_all()
    write_report(out, vars(args) | {"out": str(out)}, results, "training", "idle")
    return 0


if __name__ == "__main__":
    sys.exit(main())

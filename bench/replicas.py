"""One in-process gateway against `serve --ray --replicas 2`, on the same machine and workload.

    python -m bench.replicas --rounds 3 --requests 200 --concurrency 16 --out bench/results/replicas

Both systems serve the demo (base model, pirate, poet) and stay up side by side; the rounds
alternate A B A B so that a drifting machine slows both alike. Each round is one closed-loop
load of streamed completions over the three models; the report gives each system's median
over rounds and the ratio of the medians. On two cores, two replicas share the cores one engine
had: what this measures is the cost of the ingress hop and Ray's routing, not scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.loadgen import LoadConfig, run_load, summarize
from bench.servers import VENV_BIN, ProcessPool, free_port, wait_ready

METRICS = ("req_per_s", "output_tok_per_s", "latency_p50_ms", "latency_p99_ms", "ttft_p50_ms")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="load runs per system, alternating (default 3)")
    parser.add_argument("--requests", type=int, default=200, help="requests per run (default 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop workers (default 16)")
    parser.add_argument("--output-tokens", default="32", help="tokens per answer (default 32)")
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas of the Ray system (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and the servers' logs")
    return parser


def median_of(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def write_report(out: Path, config: dict, results: dict[str, list[dict]], top: str, bottom: str) -> dict:
    """Each side's median over rounds and `top` over `bottom`, to out/results.json and stdout."""
    report = {
        "config": config,
        "rounds": results,
        "median": {name: {key: median_of(rounds, key) for key in METRICS} for name, rounds in results.items()},
    }
    upper, lower = report["median"][top], report["median"][bottom]
    ratio_key = f"ratio_{top}_over_{bottom}"
    report[ratio_key] = {
        key: round(upper[key] / lower[key], 3) if upper[key] and lower[key] else None for key in METRICS
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({"median": report["median"], "ratio": report[ratio_key]}, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="replicas-"))
    out.mkdir(parents=True, exist_ok=True)
    gateway = str(VENV_BIN / "lora-gateway")
    systems = {
        "single": ["serve"],
        "ray": ["serve", "--ray", "--replicas", str(args.replicas), "--replica-cpus", "1"],
    }
    pool = ProcessPool()
    results: dict[str, list[dict]] = {name: [] for name in systems}
    try:
        launched = {}
        for name, extra in systems.items():
            port = free_port()
            argv = [gateway, *extra, "--port", str(port), "--state-dir", str(out / f"state-{name}")]
            launched[name] = pool.start(name, argv, out / f"{name}.log", url=f"http://127.0.0.1:{port}")
        for name, process in launched.items():
            seconds = wait_ready(process, "/ready", 600)
            print(f"{name} ready in {seconds:.0f} s", file=sys.stderr)
        for round_index in range(args.rounds):
            for name, process in launched.items():
                config = LoadConfig(
                    url=process.url,
                    models=["demo", "pirate", "poet"],
                    zipf_alpha=0.0,
                    concurrency=args.concurrency,
                    requests=args.requests,
                    warmup=args.concurrency,
                    prompt_tokens="16",
                    output_tokens=args.output_tokens,
                    seed=round_index,
                    label=name,
                )
                summary = summarize(asyncio.run(run_load(config)).records)
                results[name].append(summary)
                print(f"round {round_index + 1} {name}: {summary['req_per_s']} req/s", file=sys.stderr)
    finally:
        pool.stop_all()
    write_report(out, vars(args) | {"out": str(out)}, results, "ray", "single")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line of bench.routing_sim: the sweep's table, its JSON and its plot.

`python -m bench.routing_sim_cli --help` lists the flags.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from bench.routing_sim import POLICIES, SimConfig, SimResult, sweep


def series_label(summary: dict[str, Any], several_delays: bool) -> str:
    if summary["policy"] == "ray-multiplex" and several_delays:
        return f"ray-multiplex, report delay {summary['report_delay_s']:g} s"
    return summary["policy"]


def format_table(results: Sequence[SimResult]) -> str:
    """A Markdown table of the summaries."""
    several = len({r.summary["report_delay_s"] for r in results if r.summary["policy"] == "ray-multiplex"}) > 1
    lines = [
        "| policy | replicas | cold loads/request | loads/request | routed max/mean | routed CV | wait p50 s | wait p99 s | replicas serving the top adapter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        s = result.summary
        lines.append(
            f"| {series_label(s, several)} | {s['replicas']} | {s['cold_per_request']:.3f} | {s['loads_per_request']:.3f} "
            f"| {s['routed_max_over_mean']:.2f} | {s['routed_cv']:.3f} | {s['wait_p50_s']:.3f} | {s['wait_p99_s']:.3f} "
            f"| {s['top_adapter_replicas']} |"
        )
    return "\n".join(lines)


def to_json(results: Sequence[SimResult], base: SimConfig) -> dict[str, Any]:
    config = asdict(base)
    for name in ("policy", "replicas", "report_delay"):
        config.pop(name)
    return {
        "config": config,
        "policies": sorted({r.config.policy for r in results}, key=POLICIES.index),
        "replica_counts": sorted({r.config.replicas for r in results}),
        "report_delays_s": sorted({r.config.report_delay for r in results if r.config.policy == "ray-multiplex"}),
        "results": [r.summary for r in results],
    }


def write_plot(results: Sequence[SimResult], path: Path) -> None:
    """Cold loads, load spread and p99 latency against the number of replicas, one line a series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({r.summary["report_delay_s"] for r in results if r.summary["policy"] == "ray-multiplex"}) > 1
    series: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        series.setdefault(series_label(result.summary, several), []).append(result.summary)
    base = results[0].config
    ticks = sorted({r.config.replicas for r in results})
    fig, (cold, spread, latency) = plt.subplots(1, 3, figsize=(16, 4.8))
    for label, rows in series.items():
        rows.sort(key=lambda row: row["replicas"])
        x = [row["replicas"] for row in rows]
        cold.plot(x, [row["cold_per_request"] for row in rows], marker="o", label=label)
        spread.plot(x, [row["routed_max_over_mean"] for row in rows], marker="o", label=label)
        latency.plot(x, [row["latency_p99_s"] for row in rows], marker="o", label=label)
    cold.set(title="cold loads per request", ylabel="share of requests", ylim=(0, None))
    # Above 1 / offered load, the busiest replica is asked for more than it can serve.
    saturated = 1 / base.offered_load
    highest = max(r.summary["routed_max_over_mean"] for r in results)
    spread.set(title="load spread: busiest replica's requests / mean", ylabel="max / mean")
    spread.set_ylim(0.95, max(highest, saturated) * 1.08)
    spread.axhline(saturated, color="grey", linestyle=":", linewidth=1)
    spread.annotate("busiest replica saturated", (ticks[0], saturated), textcoords="offset points", xytext=(0, 4))
    latency.set(title="p99 latency (queue + load + service)", ylabel="seconds", yscale="log")
    latency.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    latency.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    latency.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for axes in (cold, spread, latency):
        axes.set_xscale("log", base=2)
        axes.set_xticks(ticks, labels=[str(tick) for tick in ticks])
        axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axes.set_xlabel("replicas")
        axes.grid(alpha=0.3)
    cold.legend(fontsize=8)
    fig.suptitle(
        f"{base.adapters} adapters, Zipf({base.zipf_alpha:g}), {base.max_models_per_replica} adapters a replica, "
        f"offered load {base.offered_load:g}, max_ongoing {base.max_ongoing}, seed {base.seed}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number_list(kind: type, text: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def _policy_list(text: str) -> list[str]:
    policies = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(unknown) or '(none)'}; choose from {','.join(POLICIES)}"
        )
    return policies


# The flags that set one SimConfig field each, by help group; their defaults are SimConfig's.
_FIELD_FLAGS = {
    "workload": {
        "adapters": "number of distinct adapters",
        "zipf_alpha": "popularity: the adapter of rank k is asked for in proportion to k^-alpha",
        "offered_load": "Poisson arrival rate as a share of all replicas' capacity (replicas x slots / service-seconds)",
        "requests": "measured requests per run",
        "warmup": "requests before the measured ones, to fill the caches",
        "seed": "seed of the request stream and of every random choice",
    },
    "each replica": {
        "max_models_per_replica": "adapters a replica keeps resident, least recently used out first "
        "(Ray's max_num_models_per_replica; the gateway's --max-cpu-loras)",
        "slots": "requests a replica runs at once; more wait in its queue",
        "service_seconds": "time one request takes once running",
        "load_seconds": "time to load an adapter that is not resident; a replica loads one at a time",
    },
    "policy parameters": {
        "max_ongoing": "ray-multiplex only: Ray's max_ongoing_requests, the requests a replica accepts before the "
        "router tries another; at least --slots (Ray Serve's default is 5, ray.serve.llm's 1e9)",
        "match_timeout": "ray-multiplex only: Ray's RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S; a request "
        "prefers the replicas that report its model for a time drawn from [T, 2T]",
        "virtual_nodes": "consistent hashing: ring points per replica",
        "hash_balance": "consistent-hash-bounded: a replica takes a request only while its requests in flight are "
        "below this factor times the mean",
    },
}


def build_parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="python -m bench.routing_sim_cli",
        description="Simulate routing requests for many LoRA adapters over many replicas, each with an adapter "
        "LRU cache, and measure cold loads per request and load spread. Deterministic for a seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    swept = parser.add_argument_group("what to sweep")
    swept.add_argument(
        "--policies",
        type=_policy_list,
        default=list(POLICIES),
        metavar="P,P",
        help="routing policies, comma-separated: ray-multiplex (Ray Serve's multiplexed routing), random, "
        "consistent-hash (hash ring with virtual nodes), consistent-hash-bounded (the ring with bounded loads)",
    )
    swept.add_argument(
        "--replicas",
        type=lambda t: _number_list(int, t),
        default=[4, 8, 16, 32, 64],
        metavar="N,N",
        help="replica counts",
    )
    swept.add_argument(
        "--report-delay",
        type=lambda t: _number_list(float, t),
        default=[defaults.report_delay],
        metavar="S,S",
        help="ray-multiplex only: seconds before the router sees a replica's new set of model ids; "
        "several values run ray-multiplex once per value",
    )
    for title, flags in _FIELD_FLAGS.items():
        group = parser.add_argument_group(title)
        for name, help_text in flags.items():
            default = getattr(defaults, name)
            group.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default, help=help_text)
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="PATH", help="write the configuration and every run's summary")
    out.add_argument("--plot", type=Path, metavar="PATH.png", help="draw cold loads, spread and p99 latency")
    out.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    per_run = ("policy", "replicas", "report_delay")
    base = SimConfig(**{f.name: getattr(args, f.name) for f in fields(SimConfig) if f.name not in per_run})
    runs = sum(len(args.report_delay) if p == "ray-multiplex" else 1 for p in args.policies) * len(args.replicas)
    started = time.perf_counter()
    done = itertools.count(1)

    def progress(config: SimConfig) -> None:
        if not args.quiet:
            print(
                f"\r[{next(done)}/{runs}] {config.policy} x {config.replicas} replicas "
                f"({time.perf_counter() - started:.0f} s)".ljust(60),
                end="",
                file=sys.stderr,
                flush=True,
            )

    try:
        results = sweep(base, args.policies, args.replicas, args.report_delay, progress)
    except ValueError as error:  # sweep checks every configuration before it runs any
        parser.error(str(error))
    if not args.quiet:
        print(f"\r{runs} runs in {time.perf_counter() - started:.1f} s".ljust(60), file=sys.stderr)
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(results, base), indent=2) + "\n")
    if args.plot:
        write_plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

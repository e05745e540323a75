"""bench.compare's numbers: medians over rounds, ratios, the targets, the table and the plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

SYSTEMS = ("vllm", "gateway", "vllm-plugins", "gateway-alt", "floor")  # the tables' order
# The order systems start and group in: the three the targets compare come first, so that they
# alternate side by side even when memory leaves room for only three.
RUN_ORDER = ("vllm", "gateway", "floor", "vllm-plugins", "gateway-alt")
SYSTEM_TITLES = {
    "vllm": "vLLM server",
    "vllm-plugins": "vLLM server + gateway plugins",
    "gateway": "gateway",
    "gateway-alt": "gateway (--also-gateway)",
    "floor": "floor (AsyncLLM)",
}

# (column title, summary key, higher is better)
COLUMNS = (
    ("req/s", "req_per_s", True),
    ("out tok/s", "output_tok_per_s", True),
    ("lat p50 ms", "latency_p50_ms", False),
    ("lat p99 ms", "latency_p99_ms", False),
    ("TTFT p50 ms", "ttft_p50_ms", False),
    ("TTFT p99 ms", "ttft_p99_ms", False),
)
RATIO_PAIRS = (
    ("gateway", "vllm", "gateway/vLLM"),
    ("gateway", "vllm-plugins", "gateway/vLLM+plugins"),
    ("gateway", "floor", "gateway/floor"),
    ("gateway-alt", "gateway", "also/gateway"),
    ("gateway-alt", "floor", "also/floor"),
)

THROUGHPUT_VS_VLLM = 1.25  # gateway req/s at least 1.25x vLLM's server
P99_VS_VLLM = 0.8  # gateway p99 latency at most 0.8x vLLM's server
FLOOR_OVERHEAD = 0.05  # gateway within 5% of the floor
ROUTING_FLAT = 1.10  # 10,000 adapters cost at most 10% more per call than 10


def median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric field over rounds; errors are summed instead."""
    if not summaries:
        return {}
    merged: dict[str, Any] = {}
    for key in summaries[0]:
        values = [s.get(key) for s in summaries]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if key in ("requests", "succeeded", "errors", "warmup_requests", "output_tokens"):
            merged[key] = sum(numbers)
        elif numbers and len(numbers) == len(values):
            merged[key] = round(float(statistics.median(numbers)), 3)
        elif key == "errors_by_status":
            counts: dict[str, int] = {}
            for value in values:
                for kind, count in (value or {}).items():
                    counts[kind] = counts.get(kind, 0) + count
            merged[key] = counts
        else:
            merged[key] = None
    return merged


def ratio(numerator: Any, denominator: Any) -> float | None:
    if not isinstance(numerator, int | float) or not isinstance(denominator, int | float) or not denominator:
        return None
    return round(numerator / denominator, 3)


def ratios(medians: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """For each pair present: every column's value of the first system over the second's."""
    found = {}
    for top, bottom, title in RATIO_PAIRS:
        if medians.get(top) and medians.get(bottom):
            found[title] = {key: ratio(medians[top].get(key), medians[bottom].get(key)) for _, key, _ in COLUMNS}
    return found


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(workload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and rows of one workload's table: systems, then ratio rows."""
    header = ["system", *(title for title, _, _ in COLUMNS), "errors", "CPU ms/req: server", "engine", "client"]
    rows = []
    medians = {name: data.get("median") for name, data in workload["systems"].items()}
    for name in SYSTEMS:
        data = workload["systems"].get(name)
        if not data:
            continue
        median = data["median"]
        cpu = data.get("cpu_ms_per_request") or {}
        rows.append(
            [
                SYSTEM_TITLES[name],
                *(_cell(median.get(key), 2 if key == "req_per_s" else 1) for _, key, _ in COLUMNS),
                _cell(median.get("errors")),
                _cell(cpu.get("frontend"), 2),
                _cell(cpu.get("engine"), 2),
                _cell(cpu.get("client"), 2),
            ]
        )
    for title, values in ratios(medians).items():
        rows.append(
            [
                title,
                *(f"{values[key]:.2f}x" if values[key] is not None else "-" for _, key, _ in COLUMNS),
                "",
                "",
                "",
                "",
            ]
        )
    return header, rows


def format_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([render(header), *(render(row) for row in rows)])


def format_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def workload_heading(workload: dict[str, Any]) -> str:
    settings = workload["settings"]
    return (
        f"workload {workload['key']}: {workload['title']} - concurrency {settings['concurrency']}, "
        f"Zipf({settings['zipf_alpha']:g}), prompts {settings['prompt_words']} words, "
        f"max_tokens {settings['output_tokens']}, --max-loras {settings['max_loras']}, "
        f"--max-cpu-loras {settings['max_cpu_loras']}; median of {settings['rounds']} round(s) of "
        f"{settings['requests']} requests (+{settings['warmup']} warmup)"
    )


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target, per workload where it applies: the measured value, the bar, and whether it is met."""
    targets = []
    for key, workload in results.get("workloads", {}).items():
        medians = {name: data.get("median") or {} for name, data in workload["systems"].items()}
        gateway, vllm, floor = medians.get("gateway"), medians.get("vllm"), medians.get("floor")
        if gateway and vllm:
            value = ratio(gateway.get("req_per_s"), vllm.get("req_per_s"))
            targets.append(
                {
                    "workload": key,
                    "target": f"throughput >= {THROUGHPUT_VS_VLLM}x vLLM's server",
                    "value": value,
                    "met": value is not None and value >= THROUGHPUT_VS_VLLM,
                }
            )
            value = ratio(gateway.get("latency_p99_ms"), vllm.get("latency_p99_ms"))
            targets.append(
                {
                    "workload": key,
                    "target": f"p99 latency <= {P99_VS_VLLM}x vLLM's server",
                    "value": value,
                    "met": value is not None and value <= P99_VS_VLLM,
                }
            )
        if gateway and floor:
            throughput = ratio(gateway.get("req_per_s"), floor.get("req_per_s"))
            latency = ratio(gateway.get("latency_p50_ms"), floor.get("latency_p50_ms"))
            overhead = None
            if throughput is not None and latency is not None:
                overhead = round(max(1 - throughput, latency - 1), 3)
            targets.append(
                {
                    "workload": key,
                    "target": f"overhead <= {FLOOR_OVERHEAD:.0%} vs the floor "
                    "(max of throughput loss and p50 latency gain)",
                    "value": overhead,
                    "met": overhead is not None and overhead <= FLOOR_OVERHEAD,
                    "detail": {"throughput_ratio": throughput, "latency_p50_ratio": latency},
                }
            )
    routing = results.get("routing")
    if routing:
        for kind in ("registry", "http"):
            value = routing[kind]["ratio"]
            sizes = " vs ".join(str(run["entries"]) for run in routing[kind]["runs"][::-1])
            targets.append(
                {
                    "workload": "routing",
                    "target": f"{kind} routing flat ({sizes} adapters, ratio <= {ROUTING_FLAT})",
                    "value": value,
                    "met": value <= ROUTING_FLAT,
                }
            )
    return targets


def format_targets(targets: list[dict[str, Any]]) -> str:
    lines = []
    for target in targets:
        verdict = "MET" if target["met"] else "NOT MET"
        value = "-" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(f"[{verdict:>7}] {target['workload']}: {target['target']}: {value}")
    return "\n".join(lines)


def format_routing(routing: dict[str, Any]) -> str:
    lines = []
    for kind, unit, scale in (("registry", "ns", 1.0), ("http", "us", 1e-3)):
        runs = routing[kind]["runs"]
        cells = ", ".join(f"{run['entries']} adapters: {run['median_ns'] * scale:.1f} {unit}" for run in runs)
        lines.append(
            f"{kind:<9} median per call: {cells} (ratio {routing[kind]['ratio']:.3f}, "
            f"fastest batches {routing[kind]['min_ratio']:.3f})"
        )
    return "\n".join(lines)


def format_cold(cold: dict[str, Any]) -> str:
    return (
        f"median of {cold['count']}: register {cold['register_s_median']:.3f} s, "
        f"register to first token {cold['to_first_token_s_median']:.3f} s "
        f"(first request alone {cold['first_request_ttft_s_median']:.3f} s)"
    )


def system_notes(data: dict[str, Any], base_name: str) -> list[str]:
    notes = []
    if "startup_s" in data:
        notes.append(f"ready in {data['startup_s']} s")
    if "registration" in data:
        notes.append(
            f"registered {data['registration']['count']} adapters over HTTP in {data['registration']['total_s']} s"
        )
    if data.get("probe"):
        answers = data["probe"]["models"].get(base_name, {}).get("answers", {})
        notes.append(
            "base answers in mixed batches: "
            + (
                "right"
                if data["probe"]["base_right"]
                else "WRONG (" + ", ".join(f"{text!r} x{n}" for text, n in answers.items()) + ")"
            )
        )
    if "cold_load" in data:
        notes.append("cold load " + format_cold(data["cold_load"]))
    return notes


def render_text(results: dict[str, Any], base_name: str) -> str:
    """The whole report as the terminal shows it: tables, notes, routing, targets."""
    sections = []
    for workload in results["workloads"].values():
        header, rows = table_rows(workload)
        lines = [workload_heading(workload), format_text(header, rows)]
        for system, data in workload["systems"].items():
            lines.append(f"  {SYSTEM_TITLES[system]}: " + "; ".join(system_notes(data, base_name)))
        for system, failure in workload.get("failures", {}).items():
            lines.append(f"  {SYSTEM_TITLES[system]}: FAILED: {failure.splitlines()[0]}")
        sections.append("\n".join(lines))
    if results.get("routing"):
        sections.append("routing cost (FakeEngine, in-process)\n" + format_routing(results["routing"]))
    if results.get("targets"):
        sections.append("targets\n" + format_targets(results["targets"]))
    return "\n\n".join(sections)


def render_markdown(results: dict[str, Any]) -> str:
    parts = []
    for workload in results["workloads"].values():
        header, rows = table_rows(workload)
        parts.append(f"**{workload_heading(workload)}**\n\n" + format_markdown(header, rows))
    return "\n\n".join(parts)


# -- plots ----------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {
    "vllm": "tab:orange",
    "vllm-plugins": "tab:red",
    "gateway": "tab:blue",
    "gateway-alt": "tab:purple",
    "floor": "tab:green",
}


def plot_latency(workload: dict[str, Any], records: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """End-to-end latency and TTFT CDFs of each system, all rounds' measured requests pooled."""
    plt = _pyplot()
    fig, (latency_axes, ttft_axes) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in SYSTEMS:
        rows = [r for r in records.get(name, []) if not r["warmup"] and r["error"] is None]
        for axes, field in ((latency_axes, "latency_s"), (ttft_axes, "ttft_s")):
            values = sorted(r[field] * 1000 for r in rows if r.get(field) is not None)
            if values:
                axes.plot(
                    values,
                    [(i + 1) / len(values) for i in range(len(values))],
                    drawstyle="steps-post",
                    color=COLORS[name],
                    label=f"{SYSTEM_TITLES[name]} (n={len(values)})",
                )
    latency_axes.set(title="end-to-end latency", xlabel="ms", ylabel="share of requests", ylim=(0, 1.02))
    ttft_axes.set(title="time to first token", xlabel="ms", ylabel="share of requests", ylim=(0, 1.02))
    for axes in (latency_axes, ttft_axes):
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right")
    fig.suptitle(f"workload {workload['key']}: {workload['title']}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_overview(results: dict[str, Any], path: Path) -> None:
    """Per workload and system: req/s (bars: median, whiskers: rounds' range) and p99 latency."""
    plt = _pyplot()
    workloads = list(results["workloads"].values())
    fig, (throughput_axes, p99_axes) = plt.subplots(1, 2, figsize=(13, 4.5))
    present = [name for name in SYSTEMS if any(name in w["systems"] for w in workloads)]
    width = 0.8 / max(1, len(present))
    for offset, name in enumerate(present):
        xs, medians, lows, highs, p99s = [], [], [], [], []
        for index, workload in enumerate(workloads):
            data = workload["systems"].get(name)
            if not data:
                continue
            values = [r["summary"]["req_per_s"] or 0 for r in data["rounds"]]
            median = data["median"]["req_per_s"] or 0
            xs.append(index + (offset - (len(present) - 1) / 2) * width)
            medians.append(median)
            lows.append(median - min(values))
            highs.append(max(values) - median)
            p99s.append(data["median"]["latency_p99_ms"] or 0)
        if xs:
            throughput_axes.bar(
                xs, medians, width, yerr=[lows, highs], capsize=3, color=COLORS[name], label=SYSTEM_TITLES[name]
            )
            p99_axes.bar(xs, p99s, width, color=COLORS[name], label=SYSTEM_TITLES[name])
    labels = [f"{w['key']}: {w['title']}" for w in workloads]
    throughput_axes.set(title="throughput (median of rounds; whiskers: range)", ylabel="req/s")
    p99_axes.set(title="p99 end-to-end latency (median of rounds)", ylabel="ms")
    for axes in (throughput_axes, p99_axes):
        axes.set_xticks(range(len(workloads)), labels)
        axes.grid(alpha=0.3, axis="y")
        axes.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_routing(routing: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes_pair = plt.subplots(1, 2, figsize=(11, 4))
    for axes, kind, unit, scale in ((axes_pair[0], "registry", "ns", 1.0), (axes_pair[1], "http", "µs", 1e-3)):
        runs = routing[kind]["runs"]
        labels = [f"{run['entries']:,} adapters" for run in runs]
        values = [run["median_ns"] * scale for run in runs]
        axes.bar(labels, values, color=["tab:blue", "tab:purple"][: len(runs)])
        for x, value in enumerate(values):
            axes.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom")
        title = (
            "resolve + lease (registry)" if kind == "registry" else "streamed completion through the app (FakeEngine)"
        )
        axes.set(title=f"{title}\nratio {routing[kind]['ratio']:.3f}", ylabel=f"median {unit} per call")
        axes.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def plot_profile(top: list[dict[str, Any]], title: str, path: Path) -> None:
    plt = _pyplot()
    rows = top[:15][::-1]
    fig, axes = plt.subplots(figsize=(11, 0.4 * len(rows) + 1.5))
    axes.barh([row["function"] for row in rows], [row["inclusive_pct"] for row in rows], color="tab:blue")
    axes.set_title(title, fontsize=10, loc="right")
    axes.set_xlabel("% of the gateway process's samples holding the GIL (inclusive)")
    axes.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)

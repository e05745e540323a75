"""bench.compare's parts that need no engine: flags, medians, ratios, targets, the table, the
routing micro-benchmark at small sizes, the floor's measurement loop over a fake engine,
py-spy stack summaries, and that stopping a started process stops its children too."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.compare import build_parser, resolve_args, workloads_for
from bench.floor import FloorRunner, VllmTypes, serve_commands
from bench.loadgen import LoadConfig, RequestPlanner
from bench.profiling import summarize_stacks
from bench.routing import compare_sizes
from bench.servers import EngineLimits, ProcessPool, gateway_argv, vllm_argv


def parse(*argv: str):
    return resolve_args(build_parser().parse_args(list(argv)))


# -- flags ----------------------------------------------------------------------------------------


def test_defaults_make_the_full_run():
    args = parse()
    assert (args.requests, args.rounds, args.concurrency, args.warmup) == (400, 5, 32, 32)
    assert args.workloads == ["a", "b", "routing"]
    assert args.many_adapters == 64 and args.cold_loads == 5
    assert args.plots == args.out and not args.skip_vllm and not args.skip_floor


def test_quick_is_tiny_but_explicit_flags_win():
    args = parse("--quick", "--requests", "10", "--out", "somewhere")
    assert (args.requests, args.rounds, args.concurrency, args.warmup, args.many_adapters) == (10, 1, 8, 8, 12)
    assert args.out == Path("somewhere") == args.plots


def test_workloads_flag_checks_names(capsys):
    assert parse("--workloads", "b, routing").workloads == ["b", "routing"]
    with pytest.raises(SystemExit) as exit_info:
        parse("--workloads", "a,c")
    assert exit_info.value.code == 2
    assert "choose from a, b and routing" in capsys.readouterr().err


def test_skip_flags_and_bad_counts(capsys):
    args = parse("--skip-vllm", "--skip-floor", "--no-probe", "--profile")
    assert args.skip_vllm and args.skip_floor and args.no_probe and args.profile and args.interleave
    assert not parse("--no-interleave").interleave
    with pytest.raises(SystemExit):
        parse("--requests", "0")
    with pytest.raises(SystemExit):
        parse("--output-tokens", "zero")


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--requests", "--concurrency", "--workloads", "--out", "--skip-vllm", "--skip-floor", "--quick"):
        assert flag in text


def test_workloads_match_the_issue():
    workloads = workloads_for(parse())
    a, b = workloads["a"], workloads["b"]
    assert a.include_base and a.names() == ["lora0", "lora1", "lora2"] and not a.register_via_api
    assert not b.include_base and len(b.names()) == 64 and b.max_cpu_loras == 8 and b.register_via_api


# -- the same engine limits for both servers ------------------------------------------------------


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_both_servers_get_the_same_engine_limits(tmp_path):
    from server.commands.cli import build_parser as gateway_parser

    limits = EngineLimits(max_loras=4, max_cpu_loras=8, max_lora_rank=16, max_model_len=1024)
    adapters = {"lora0": tmp_path / "lora0", "lora1": tmp_path / "lora1"}
    vllm = vllm_argv(tmp_path / "base", adapters, limits, 8001)
    gateway = gateway_argv(tmp_path / "base", adapters, limits, 8002, tmp_path / "state")
    assert vllm[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "--enable-lora" in vllm
    for name in (
        "--max-loras",
        "--max-cpu-loras",
        "--max-lora-rank",
        "--max-model-len",
        "--max-num-seqs",
        "--dtype",
        "--served-model-name",
        "--model",
    ):
        assert _flag(vllm, name) == _flag(gateway, name)
    assert _flag(vllm, "--gpu-memory-utilization") == _flag(gateway, "--kv-cache-fraction") == "0.2"
    assert vllm[vllm.index("--lora-modules") + 1 :][:2] == [
        f"lora0={tmp_path / 'lora0'}",
        f"lora1={tmp_path / 'lora1'}",
    ]
    # Every flag given to the gateway is one it has.
    parsed = gateway_parser().parse_args(gateway[1:])
    assert parsed.max_cpu_loras == 8 and parsed.lora_modules == [
        f"lora0={tmp_path / 'lora0'}",
        f"lora1={tmp_path / 'lora1'}",
    ]


# -- medians, ratios, targets and the table ---------------------------------------------------------


def summary(req_per_s: float, p99: float, p50: float = 100.0, errors: int = 0) -> dict[str, Any]:
    return {
        "requests": 100,
        "warmup_requests": 8,
        "succeeded": 100 - errors,
        "errors": errors,
        "errors_by_status": {"500": errors} if errors else {},
        "duration_s": 10.0,
        "req_per_s": req_per_s,
        "output_tokens": 300,
        "output_tok_per_s": req_per_s * 3,
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "ttft_p50_ms": p50 / 2,
        "ttft_p99_ms": p99 / 2,
        "start_lag_p99_ms": None,
    }


def system(*summaries: dict[str, Any]) -> dict[str, Any]:
    rounds = [{"summary": s, "cpu_s": {"frontend": 0.5, "engine": 2.0}} for s in summaries]
    return {
        "rounds": rounds,
        "median": report.median_summary(list(summaries)),
        "cpu_ms_per_request": {"frontend": 4.63, "engine": 18.5},
    }


def workload(**systems: dict[str, Any]) -> dict[str, Any]:
    settings = {
        "concurrency": 32,
        "zipf_alpha": 1.0,
        "prompt_words": "16:48",
        "output_tokens": "16",
        "max_loras": 4,
        "max_cpu_loras": 8,
        "rounds": 3,
        "requests": 100,
        "warmup": 8,
    }
    return {"key": "a", "title": "base model + 3 adapters", "settings": settings, "systems": systems}


def test_median_summary_takes_medians_and_sums_counts():
    merged = report.median_summary([summary(10, 900), summary(30, 100, errors=2), summary(20, 500)])
    assert merged["req_per_s"] == 20 and merged["latency_p99_ms"] == 500
    assert merged["errors"] == 2 and merged["requests"] == 300 and merged["errors_by_status"] == {"500": 2}
    assert merged["start_lag_p99_ms"] is None


def test_ratios_and_table_rows():
    data = workload(vllm=system(summary(20, 1000)), gateway=system(summary(25, 800)), floor=system(summary(26, 760)))
    header, rows = report.table_rows(data)
    assert header[:3] == ["system", "req/s", "out tok/s"]
    titles = [row[0] for row in rows]
    assert titles == ["vLLM server", "gateway", "floor (AsyncLLM)", "gateway/vLLM", "gateway/floor"]
    gateway_vs_vllm = rows[3]
    assert gateway_vs_vllm[1] == "1.25x" and gateway_vs_vllm[4] == "0.80x"  # req/s, lat p99
    assert rows[4][1] == "0.96x"
    assert rows[1][1] == "25.00" and rows[1][-3:] == ["4.63", "18.50", "-"]
    text = report.format_text(header, rows)
    assert text.splitlines()[0].startswith("system") and "gateway/floor" in text
    markdown = report.format_markdown(header, rows)
    assert markdown.splitlines()[1].startswith("|---|---:") and markdown.count("\n") == len(rows) + 1


def test_missing_systems_leave_out_their_ratios():
    header, rows = report.table_rows(workload(gateway=system(summary(25, 800))))
    assert [row[0] for row in rows] == ["gateway"]
    assert report.ratio(None, 3) is None and report.ratio(3, 0) is None


def test_targets_met_and_missed():
    results = {
        "workloads": {
            "a": workload(
                vllm=system(summary(20, 1000)), gateway=system(summary(25, 800)), floor=system(summary(26, 760, p50=98))
            ),
            "b": workload(
                vllm=system(summary(20, 1000)),
                gateway=system(summary(18, 1200)),
                floor=system(summary(20, 1000, p50=80)),
            ),
        },
        "routing": {
            "registry": {"ratio": 1.02, "runs": [{"entries": 10}, {"entries": 10000}]},
            "http": {"ratio": 1.3, "runs": [{"entries": 10}, {"entries": 10000}]},
        },
    }
    targets = {(t["workload"], t["target"].split(" ")[0]): t for t in report.evaluate_targets(results)}
    assert targets[("a", "throughput")]["met"] and targets[("a", "throughput")]["value"] == 1.25
    assert targets[("a", "p99")]["met"]
    assert targets[("a", "overhead")]["met"]  # 4% fewer req/s, 2% slower p50
    assert not targets[("b", "throughput")]["met"] and not targets[("b", "p99")]["met"]
    assert not targets[("b", "overhead")]["met"] and targets[("b", "overhead")]["value"] == 0.25
    assert targets[("routing", "registry")]["met"] and not targets[("routing", "http")]["met"]
    text = report.format_targets(report.evaluate_targets(results))
    assert "[    MET] a: throughput >= 1.25x" in text and "[NOT MET] routing: http routing flat" in text


# -- the routing micro-benchmark ------------------------------------------------------------------


async def test_registry_routing_cost_at_small_sizes():
    result = await compare_sizes("registry", [5, 200], batches=3, batch=200)
    assert [run["entries"] for run in result["runs"]] == [5, 200]
    for run in result["runs"]:
        assert 0 < run["min_ns"] <= run["median_ns"] <= run["max_ns"]
    # The ratio is the benchmark's figure (docs/benchmarks.md); here only that it is computed from the medians.
    assert result["ratio"] == round(result["runs"][-1]["median_ns"] / result["runs"][0]["median_ns"], 3)


async def test_http_routing_cost_at_small_sizes():
    result = await compare_sizes("http", [3, 30], batches=2, batch=4)
    assert [run["entries"] for run in result["runs"]] == [3, 30]
    assert all(0 < run["median_ns"] < 1e9 for run in result["runs"])


# -- the floor's measurement loop, over a fake AsyncLLM -------------------------------------------


@dataclass
class FakeOutput:
    text: str
    token_ids: list[int]


@dataclass
class FakeRequestOutput:
    outputs: list[FakeOutput]
    finished: bool
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])


class FakeAsyncLLM:
    """Streams max_tokens one-token deltas; records the LoRA each request carried."""

    def __init__(self) -> None:
        self.loras: list[Any] = []

    async def generate(self, prompt: Any, params: dict[str, Any], request_id: str, *, lora_request: Any = None):
        self.loras.append(lora_request)
        for i in range(params["max_tokens"]):
            await asyncio.sleep(0)
            yield FakeRequestOutput([FakeOutput(f"w{i} ", [i])], finished=i == params["max_tokens"] - 1)

    async def abort(self, request_id: str) -> None:
        pass


FAKE_TYPES = VllmTypes(
    lora_request=lambda name, index, path: (name, index, path), sampling_params=lambda **kwargs: kwargs, delta="delta"
)


async def test_floor_measures_like_loadgen():
    engine = FakeAsyncLLM()
    runner = FloorRunner(engine, "base", {"lora0": "/a/lora0", "lora1": "/a/lora1"}, types=FAKE_TYPES)
    config = LoadConfig(
        base_model="base",
        adapters=["lora0", "lora1"],
        include_base=True,
        concurrency=4,
        requests=20,
        warmup=4,
        output_tokens="3",
        prompt_tokens="5",
        seed=7,
    )
    result = await runner.run(config)
    planned = RequestPlanner(config)
    assert [r.model for r in result.records] == [planned.next().model for _ in range(24)]
    assert result.summary["requests"] == 20 and result.summary["errors"] == 0
    assert all(r.output_tokens == 3 and r.ttft_s is not None and len(r.itl_s) == 2 for r in result.records)
    # Base-model requests carry no LoRA; adapters carry theirs, ids from 1 in the given order.
    expected = {"base": None, "lora0": ("lora0", 1, "/a/lora0"), "lora1": ("lora1", 2, "/a/lora1")}
    assert engine.loras == [expected[r.model] for r in result.records]  # sent in index order


async def test_floor_counts_an_unknown_adapter_as_an_error():
    runner = FloorRunner(FakeAsyncLLM(), "base", {}, types=FAKE_TYPES)
    result = await runner.run(LoadConfig(adapters=["nope"], requests=2, output_tokens="2"))
    assert result.summary["errors"] == 2 and result.records[0].error_kind == "engine"


async def test_floor_answers_commands(tmp_path):
    import io

    import orjson

    class Engine(FakeAsyncLLM):
        shut = False

        def shutdown(self) -> None:
            self.shut = True

    engine = Engine()
    config = LoadConfig(
        base_model="base", adapters=["lora0"], include_base=True, requests=6, output_tokens="2", label="floor-a-r1"
    )
    commands = io.StringIO(
        "\n".join(
            orjson.dumps(c).decode()
            for c in [
                {"cmd": "round", "config": config.to_json(), "out": str(tmp_path / "round.json")},
                {
                    "cmd": "probe",
                    "models": ["base", "lora0"],
                    "prompt_token_ids": [1, 2],
                    "max_tokens": 2,
                    "repeats": 2,
                    "out": str(tmp_path / "probe.json"),
                },
                {"cmd": "dance", "out": str(tmp_path / "x.json")},
                {"cmd": "exit"},
            ]
        )
        + "\n"
    )
    answers = io.StringIO()
    spec = {"base_name": "base", "loras": {"lora0": "/a/lora0"}}
    await serve_commands(spec, commands, answers, engine=engine, types=FAKE_TYPES)
    lines = answers.getvalue().splitlines()
    assert lines[:3] == ["@floor ready", "@floor done", "@floor done"]
    assert lines[3].startswith("@floor error ValueError: unknown command") and engine.shut
    run = orjson.loads((tmp_path / "round.json").read_bytes())
    assert (
        run["label"] == "floor-a-r1" and run["summary"]["requests"] == 6 and set(run["cpu_s"]) == {"frontend", "engine"}
    )
    # The probe keeps each request's last output (the fake streams deltas, so the last word).
    assert orjson.loads((tmp_path / "probe.json").read_bytes()) == {"base": ["w1 ", "w1 "], "lora0": ["w1 ", "w1 "]}


def test_floor_session_reads_answers_and_notices_errors(tmp_path):
    """The command channel: answers among other output, an error answer, and a process that dies."""
    from types import SimpleNamespace

    from bench.sessions import FloorSession

    script = (
        "import sys\n"
        "print('vllm says hello'); print('@floor ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    if 'fail' in line: print('@floor error ValueError: no', flush=True)\n"
        "    elif 'quit' in line: sys.exit(3)\n"
        "    else: print('noise'); print('@floor done', flush=True)\n"
    )
    pool = ProcessPool()
    session = FloorSession(SimpleNamespace(pool=pool), workload=None, base_name="base", prompt_ids=[])
    session.launched = pool.start("floor", [sys.executable, "-c", script], tmp_path / "floor.log", pipes=True)
    try:
        session._expect("ready", 10)
        session._send({"cmd": "round"}, 10)
        with pytest.raises(RuntimeError, match="the floor failed: ValueError: no"):
            session._send({"cmd": "fail"}, 10)
        with pytest.raises(RuntimeError, match="the floor exited with 3"):
            session._send({"cmd": "quit"}, 10)
    finally:
        pool.stop_all()


# -- py-spy stacks --------------------------------------------------------------------------------


def test_stack_summary_shares_and_areas():
    text = "\n".join(
        [
            "<module> (lora-gateway:6);main (server/commands/cli.py:95);serve_app (server/commands/serving.py:79);"
            "_stream (server/openai/completions.py:80);sse_event (server/http/responses.py:34) 6",
            "<module> (lora-gateway:6);main (server/commands/cli.py:95);Registry.lease (adapters/registry.py:292) 2",
            "<module> (lora-gateway:6);OutputProcessor.process_outputs (vllm/v1/engine/output_processor.py:739) 2",
            "Thread._bootstrap (threading.py:1002);Condition.wait (threading.py:327) 40",
        ]
    )
    summary = summarize_stacks(text)
    assert summary["samples"] == 10 and summary["idle_samples_dropped"] == 40
    assert summary["areas_self_pct"] == {"gateway: server/": 60.0, "gateway: adapters/": 20.0, "vllm": 20.0}
    own = {row["function"]: row["inclusive_pct"] for row in summary["gateway_inclusive"]}
    assert own["_stream (server/openai/completions.py)"] == 60.0 and "main (server/commands/cli.py)" not in own


# -- stopping what was started --------------------------------------------------------------------


def test_stopping_a_process_stops_its_children(tmp_path):
    pool = ProcessPool()
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); "
        f"open({str(child_pid)!r}, 'w').write(str(child.pid)); time.sleep(60)"
    )
    launched = pool.start("parent", [sys.executable, "-c", script], tmp_path / "parent.log")
    deadline = time.monotonic() + 10
    while not child_pid.exists() or not child_pid.read_text():
        assert time.monotonic() < deadline, launched.log_tail()
        time.sleep(0.05)
    child = int(child_pid.read_text())
    started = time.monotonic()
    pool.stop_all()
    assert time.monotonic() - started < 10
    assert launched.process.returncode is not None
    time.sleep(0.1)
    status = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip()
    assert status in ("", "Z"), f"child {child} still running: {status}"
    assert not os.path.exists(f"/proc/{child}") or status == "Z"


def test_only_the_vllm_plugins_system_gets_the_engine_plugins(tmp_path, monkeypatch):
    from bench.sessions import system_env
    from server.engine.lora_ops import ENV as LORA_ENV
    from server.engine.wait import ENV

    for system in ("vllm", "gateway"):
        assert ENV not in system_env(system) and LORA_ENV not in system_env(system)
    assert system_env("vllm-plugins")[ENV] == "200:500" and system_env("vllm-plugins")[LORA_ENV] == "1"
    # A variable left in the caller's environment reaches no system the pool starts.
    monkeypatch.setenv(ENV, "1:1")
    pool = ProcessPool()
    out = tmp_path / "env.txt"
    script = f"import os; open({str(out)!r}, 'w').write(os.environ.get({ENV!r}, 'unset'))"
    launched = pool.start("env", [sys.executable, "-c", script], tmp_path / "env.log")
    launched.process.wait(timeout=30)
    assert out.read_text() == "unset"
    launched = pool.start("env", [sys.executable, "-c", script], tmp_path / "env.log", env=system_env("vllm-plugins"))
    launched.process.wait(timeout=30)
    assert out.read_text() == "200:500"
    pool.stop_all()


def test_systems_interleave_in_groups_that_fit_in_memory():
    from bench.compare import split_for_memory

    systems = ["vllm", "gateway", "vllm-plugins", "floor"]
    assert split_for_memory(systems, 4.5, 22.0) == [systems]
    assert split_for_memory(systems, 7.0, 23.5) == [["vllm", "gateway", "vllm-plugins"], ["floor"]]
    assert split_for_memory(systems, 7.0, 20.0) == [["vllm", "gateway"], ["vllm-plugins", "floor"]]
    assert split_for_memory(systems, 7.0, 5.0) == [[s] for s in systems]


def test_the_systems_the_targets_compare_start_together():
    from bench.compare import split_for_memory

    assert set(report.RUN_ORDER) == set(report.SYSTEMS)
    assert split_for_memory(list(report.RUN_ORDER[:4]), 6.5, 22.8)[0] == ["vllm", "gateway", "floor"]

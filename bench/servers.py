"""Starting and stopping the servers bench.compare measures: vLLM's own server and the gateway.

Each server runs in a session of its own, so stopping it also stops the engine-core process it
spawned. `ProcessPool` stops everything it started, whatever ends the run (an error, Ctrl-C,
SIGTERM).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from server.config import Settings
from server.engine.plugins import plugin_env

VENV_BIN = Path(sys.executable).parent
STOP_SECONDS = 45.0  # the gateway drains first; an idle one exits within a second or two


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_max_model_len(model_dir: Path) -> int:
    """What the gateway uses when --max-model-len is not given: the model's, capped at 4096."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config") or config
    return min(int(config.get("max_position_embeddings") or 4096), 4096)


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings every system under test gets, so that only the serving layer differs."""

    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int = 16
    max_model_len: int = 1024
    max_num_seqs: int = 64
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.2  # the gateway's --kv-cache-fraction


@dataclass
class Launched:
    """A process bench.compare started, and where its output goes."""

    name: str
    process: subprocess.Popen
    log_path: Path
    url: str = ""

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.process.pid


class ProcessPool:
    """Every process started for the run; `stop_all` ends them (their whole session)."""

    def __init__(self) -> None:
        self._running: list[Launched] = []

    def start(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        url: str = "",
        cwd: Path | None = None,
        pipes: bool = False,
    ) -> Launched:
        """Start `argv` in a new session, output to `log_path`; with `pipes`, stdin and stdout are
        pipes to talk over, and only stderr goes to the log."""
        log = log_path.open("wb")
        # The gateway's engine plugins act on these variables; no system inherits them from here.
        plugin_vars = plugin_env(Settings.model_construct()).keys()
        inherited = {key: value for key, value in os.environ.items() if key not in plugin_vars}
        try:
            process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log if pipes else subprocess.STDOUT,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                env={**inherited, **(env or {})},
                start_new_session=True,
                cwd=cwd,
            )
        finally:
            log.close()
        launched = Launched(name, process, log_path, url)
        self._running.append(launched)
        return launched

    def stop(self, launched: Launched, timeout: float = STOP_SECONDS) -> None:
        """SIGTERM the process's session, then SIGKILL it after `timeout` seconds."""
        if launched in self._running:
            self._running.remove(launched)
        process = launched.process
        if process.poll() is None:
            _signal_session(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # The engine core may outlive its parent for a moment; it is in the same session.
        _signal_session(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.wait(timeout=10)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def stop_all(self) -> None:
        for launched in list(reversed(self._running)):
            try:
                self.stop(launched)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"compare: could not stop {launched.name} (pid {launched.pid}): {exc}", file=sys.stderr)


def _signal_session(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the session leader's pid is its process group id
    except (ProcessLookupError, PermissionError):
        pass


def wait_ready(launched: Launched, path: str, timeout: float) -> float:
    """Poll GET url+path until 200; the seconds it took. Raises if the process dies or time runs out."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if launched.process.poll() is not None:
            raise RuntimeError(
                f"{launched.name} exited with status {launched.process.returncode}:\n{launched.log_tail()}"
            )
        try:
            if httpx.get(launched.url + path, timeout=2.0).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{launched.name} not ready within {timeout:.0f} s:\n{launched.log_tail()}")


def vllm_argv(
    base: Path, adapters: dict[str, Path], limits: EngineLimits, port: int, served_name: str = "base"
) -> list[str]:
    """vLLM's OpenAI server with the same engine limits the gateway passes to its AsyncLLM."""
    argv = [
        str(VENV_BIN / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base),
        "--served-model-name",
        served_name,
        "--enable-lora",
        "--max-loras",
        str(limits.max_loras),
        "--max-cpu-loras",
        str(limits.max_cpu_loras),
        "--max-lora-rank",
        str(limits.max_lora_rank),
        "--max-model-len",
        str(limits.max_model_len),
        "--max-num-seqs",
        str(limits.max_num_seqs),
        "--dtype",
        limits.dtype,
        "--gpu-memory-utilization",
        str(limits.gpu_memory_utilization),
        # The gateway takes sampling defaults from the request only, never from the model's files.
        "--generation-config",
        "vllm",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if adapters:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return argv


def gateway_argv(
    base: Path,
    adapters: dict[str, Path],
    limits: EngineLimits,
    port: int,
    state_dir: Path,
    served_name: str = "base",
    command: list[str] | None = None,
) -> list[str]:
    """`lora-gateway serve` with the limits; `command` replaces `lora-gateway` (e.g. python -m server)."""
    argv = [
        *(command or [str(VENV_BIN / "lora-gateway")]),
        "serve",
        "--model",
        str(base),
        "--served-model-name",
        served_name,
        "--max-loras",
        str(limits.max_loras),
        "--max-cpu-loras",
        str(limits.max_cpu_loras),
        "--max-lora-rank",
        str(limits.max_lora_rank),
        "--max-model-len",
        str(limits.max_model_len),
        "--max-num-seqs",
        str(limits.max_num_seqs),
        "--dtype",
        limits.dtype,
        "--kv-cache-fraction",
        str(limits.gpu_memory_utilization),
        "--log-format",
        "json",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
    ]
    if adapters:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return argv


def cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by `root` ("frontend") and by its descendants
    ("engine": vLLM's engine core and its helpers). Linux /proc only; zeros elsewhere."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = {"frontend": 0.0, "engine": 0.0}
    for pid in _tree(root):
        try:
            parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used = (int(parts[11]) + int(parts[12])) / tick  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
        totals["frontend" if pid == root else "engine"] += used
    return totals


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return [root]
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found

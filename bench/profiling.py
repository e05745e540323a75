"""Profiling the gateway under load with py-spy, and reading py-spy's collapsed stacks.

`py-spy record --format raw` writes one line per distinct stack: `frame;frame;...;frame COUNT`,
each frame `function (file:line)`, outermost first. `summarize_stacks` turns that into the
share of samples per function (inclusive and self) and per area (the gateway's own code, vLLM's
frontend, the web stack, ...).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Innermost frames of a thread that waits rather than works (in case py-spy counts it).
IDLE = re.compile(
    r"^(select|poll|_PollLikeSelector\.select|EpollSelector\.select|Condition\.wait|Event\.wait|"
    r"Queue\.get|sleep|wait|_wait_for_tstate_lock|_worker|WorkerThread\.run) "
    r"\((selectors|threading|queue|multiprocessing/connection|concurrent/futures/thread|time|"
    r"anyio/_backends/_asyncio)\.py"
)
# Frames every sample of the main thread has: the command and uvicorn's start, not costs.
ENTRY = re.compile(r"(^|/)server/(commands/cli|commands/serving|__main__)\.py$")
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# The first matching pattern names a frame's area.
AREAS = (
    ("gateway: server/", re.compile(r"(^|/)server/")),
    ("gateway: adapters/", re.compile(r"(^|/)adapters/")),
    ("vllm", re.compile(r"(^|/)vllm/")),
    ("tokenizers/transformers", re.compile(r"(^|/)(tokenizers|transformers)/")),
    ("web: starlette/fastapi/uvicorn/h11/httptools", re.compile(r"(^|/)(starlette|fastapi|uvicorn|h11|httptools)/")),
    ("pydantic", re.compile(r"(^|/)pydantic(_core)?/")),
    ("prometheus_client", re.compile(r"(^|/)prometheus_client/")),
    ("logging", re.compile(r"(^|/)logging/")),
    ("asyncio", re.compile(r"(^|/)asyncio/")),
    ("zmq/msgspec (engine IPC)", re.compile(r"(^|/)(zmq|msgspec)/")),
)


def py_spy_path() -> str | None:
    found = shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy")
    return str(found) if found and Path(found).exists() else None


def start_py_spy(pid: int, out: Path, rate: int = 200) -> subprocess.Popen:
    """py-spy sampling `pid` until stopped with `stop_py_spy`; collapsed stacks go to `out`.

    `--gil` keeps only samples of the thread holding the GIL: the Python work that competes for
    the gateway's one interpreter, without threads that sit waiting.
    """
    binary = py_spy_path()
    if binary is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return subprocess.Popen(
        [binary, "record", "--gil", "--format", "raw", "--rate", str(rate), "--pid", str(pid), "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def stop_py_spy(process: subprocess.Popen, timeout: float = 30.0) -> str:
    """Ctrl-C makes py-spy write its output; returns what it said on stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return (err or b"").decode(errors="replace")[-2000:]


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame."""
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    return match["function"], match["file"]


def area_of(file: str) -> str:
    for name, pattern in AREAS:
        if pattern.search(file):
            return name
    return "other"


def summarize_stacks(text: str, top: int = 25) -> dict[str, Any]:
    """Shares of samples: by function (inclusive, self) and by area of the innermost frame."""
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    own_inclusive: Counter[str] = Counter()  # the gateway's own functions only
    total = idle = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if IDLE.match(stack.rsplit(";", 1)[-1]):
            idle += count
            continue
        total += count
        frames = [parse_frame(frame) for frame in stack.split(";")]
        seen = set()
        for function, file in frames:
            key = f"{function} ({file})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += count
                if area_of(file).startswith("gateway") and not ENTRY.search(file):
                    own_inclusive[key] += count
        function, file = frames[-1]
        self_time[f"{function} ({file})"] += count
        areas[area_of(file)] += count  # self time: where the sample was actually running

    def shares(counter: Counter[str]) -> list[dict[str, Any]]:
        return (
            [
                {"function": key, "samples": value, "inclusive_pct": round(100 * value / total, 2)}
                for key, value in counter.most_common(top)
            ]
            if total
            else []
        )

    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "inclusive": shares(inclusive),
        "self": [
            {"function": key, "samples": value, "self_pct": round(100 * value / total, 2)}
            for key, value in self_time.most_common(top)
        ]
        if total
        else [],
        "gateway_inclusive": shares(own_inclusive),
        "areas_self_pct": {key: round(100 * value / total, 2) for key, value in areas.most_common()} if total else {},
    }

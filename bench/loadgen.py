"""A load generator for OpenAI-compatible servers that serve many LoRA adapters.

`python -m bench.loadgen --url http://127.0.0.1:8000 --adapter-prefix lora --num-adapters 8`
streams completions at the server, closed loop (--concurrency) or open loop (--rate), and reports
throughput, latency, time to first token and inter-token latency. In-process callers use
`run_load(LoadConfig(...))` and `summarize(records)`. Every option is described in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

# Common English words that most BPE tokenizers (Llama, Qwen, GPT) encode as one token each
# with their leading space, so a prompt of N words is close to N prompt tokens.
WORDS = tuple(
    """the of and to in is was for on that with as by at from his her they this have had not are
    but be he it all were which one their she there been has when who will more no if out so said
    what up its about than into them can only other new some could time these two may then do
    first any my now such like our over man me even most made after also did many before must
    through back years where much your way well down should because each just those people how
    too little state good very make world still own see men work long get here between both life
    being under never day same another know while last might us great old year off come since
    against go came right used take three""".split()
)
PERCENTILES = (50, 90, 99)
_LENGTH_FORMS = "a count N, a uniform range LO:HI, or normal:MEAN:STD (whole numbers of tokens, >= 1)"


@dataclass(frozen=True)
class LengthSpec:
    """A token-count distribution: fixed `16`, uniform `8:32` (inclusive) or `normal:20:5`."""

    kind: str  # "fixed", "uniform" or "normal"
    low: float
    high: float = 0.0  # uniform: the upper bound; normal: the standard deviation

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        text = str(text).strip()
        parts = text.split(":")
        spec: LengthSpec | None = None
        try:
            if len(parts) == 3 and parts[0] == "normal":
                spec = cls("normal", float(parts[1]), float(parts[2]))
            elif len(parts) == 2:
                spec = cls("uniform", int(parts[0]), int(parts[1]))
            elif len(parts) == 1:
                spec = cls("fixed", int(parts[0]))
        except ValueError:
            pass
        if spec is None:
            raise ValueError(f"expected {_LENGTH_FORMS}; got {text!r}")
        if problem := spec._problem():
            raise ValueError(f"{problem}; got {text!r}")
        return spec

    def _problem(self) -> str | None:
        if self.kind == "fixed" and self.low < 1:
            return "a token count must be >= 1"
        if self.kind == "uniform" and not 1 <= self.low <= self.high:
            return "a range LO:HI needs 1 <= LO <= HI"
        if self.kind == "normal" and not (self.low >= 1 and self.high >= 0 and math.isfinite(self.low + self.high)):
            return "normal:MEAN:STD needs MEAN >= 1 and STD >= 0"
        return None

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.low)
        if self.kind == "uniform":
            return rng.randint(int(self.low), int(self.high))
        return max(1, round(rng.gauss(self.low, self.high)))  # clipped at 1 token

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.low))
        if self.kind == "uniform":
            return f"{int(self.low)}:{int(self.high)}"
        return f"normal:{self.low:g}:{self.high:g}"


def zipf_weights(count: int, alpha: float) -> list[float]:
    """Probabilities of ranks 1..count under Zipf(alpha): P(k) = k**-alpha / sum(j**-alpha)."""
    raw = [rank**-alpha for rank in range(1, count + 1)]
    total = sum(raw)
    return [weight / total for weight in raw]


@dataclass
class LoadConfig:
    """One load run; the fields mirror the command-line flags (minus --json, --plot, --compare)."""

    url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"
    api_key: str | None = None
    models: list[str] = field(default_factory=list)
    base_model: str | None = None
    adapters: list[str] = field(default_factory=list)
    adapter_prefix: str | None = None
    num_adapters: int | None = None
    include_base: bool = False
    zipf_alpha: float = 1.0
    concurrency: int | None = None  # closed loop; 1 when neither this nor rate is given
    rate: float | None = None  # open loop, requests per second
    max_in_flight: int = 1000
    requests: int | None = None  # 100 when neither this nor duration is given
    duration: float | None = None
    warmup: int = 0
    prompt_tokens: LengthSpec | str = "128"
    output_tokens: LengthSpec | str = "128"
    seed: int = 0
    timeout: float = 120.0
    label: str = ""
    extra_body: dict[str, Any] = field(default_factory=dict)  # more request fields, e.g. {"ignore_eos": True}

    def __post_init__(self) -> None:
        self.prompt_tokens = _length(self.prompt_tokens, "--prompt-tokens")
        self.output_tokens = _length(self.output_tokens, "--output-tokens")
        if self.rate is None and self.concurrency is None:
            self.concurrency = 1
        if self.requests is None and self.duration is None:
            self.requests = 100
        if problem := self._problem():
            raise ValueError(problem)

    def _problem(self) -> str | None:
        names = self.model_names()
        repeated = sorted(name for name, count in Counter(names).items() if count > 1)
        checks = [
            (
                self.endpoint not in ("completions", "chat"),
                f"--endpoint must be completions or chat, not {self.endpoint!r}",
            ),
            (
                bool(self.models and (self.base_model or self.adapters or self.adapter_prefix)),
                "--models names every model: leave out --base-model, --adapters and --adapter-prefix",
            ),
            (bool(self.adapters and self.adapter_prefix), "give --adapters or --adapter-prefix, not both"),
            (
                (self.adapter_prefix is None) != (self.num_adapters is None),
                "--adapter-prefix and --num-adapters go together",
            ),
            (self.include_base and not self.base_model, "--include-base needs --base-model NAME"),
            (
                not names,
                "no models to call: give --models, --adapters, --adapter-prefix with --num-adapters, or --base-model",
            ),
            (bool(repeated), f"model names must be distinct; repeated: {', '.join(repeated)}"),
            (
                not (self.zipf_alpha >= 0 and math.isfinite(self.zipf_alpha)),
                f"--zipf-alpha must be >= 0, not {self.zipf_alpha}",
            ),
            (
                self.concurrency is not None and self.rate is not None,
                "give --concurrency (closed loop) or --rate (open loop), not both",
            ),
        ]
        for flag, value, minimum in (
            ("--num-adapters", self.num_adapters, 1),
            ("--concurrency", self.concurrency, 1),
            ("--max-in-flight", self.max_in_flight, 1),
            ("--requests", self.requests, 1),
            ("--warmup", self.warmup, 0),
        ):
            checks.append((value is not None and value < minimum, f"{flag} must be >= {minimum}, not {value}"))
        for flag, value in (("--rate", self.rate), ("--duration", self.duration), ("--timeout", self.timeout)):
            checks.append(
                (
                    value is not None and not (value > 0 and math.isfinite(value)),
                    f"{flag} must be a positive number, not {value}",
                )
            )
        return next((message for failed, message in checks if failed), None)

    def model_names(self) -> list[str]:
        """The models in popularity order: rank 1 first."""
        if self.models:
            return list(self.models)
        adapters = list(self.adapters)
        if self.adapter_prefix is not None:
            adapters = [f"{self.adapter_prefix}{i}" for i in range(self.num_adapters or 0)]
        if self.base_model and (self.include_base or not adapters):
            return [self.base_model, *adapters]  # the base model is rank 1
        return adapters

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self) | {"prompt_tokens": str(self.prompt_tokens), "output_tokens": str(self.output_tokens)}
        data["api_key"] = "***" if self.api_key else None
        data["model_names"] = self.model_names()
        return data


def _length(value: LengthSpec | str | int, flag: str) -> LengthSpec:
    if isinstance(value, LengthSpec):
        return value
    try:
        return LengthSpec.parse(str(value))
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; start_s and end_s count from the run's start."""

    index: int
    model: str
    warmup: bool
    prompt_words: int
    max_tokens: int
    scheduled_s: float | None = None  # open loop: the Poisson arrival time
    start_s: float = 0.0
    end_s: float = 0.0
    latency_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    tokens_from_usage: bool = False
    usage_prompt_tokens: int | None = None
    status: int | None = None
    error: str | None = None
    error_kind: str | None = None  # the HTTP status, or timeout, connection, stream_error, incomplete, protocol

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunResult:
    """A finished run: its configuration, every request, and the summary of the measured ones."""

    config: LoadConfig
    records: list[RequestRecord]
    summary: dict[str, Any]
    started_at: str
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.config.label,
            "started_at": self.started_at,
            "wall_s": self.wall_s,
            "config": self.config.to_json(),
            "summary": self.summary,
            "records": [asdict(record) for record in self.records],
        }


@dataclass
class PlannedRequest:
    index: int
    model: str
    prompt: str
    prompt_words: int
    max_tokens: int
    warmup: bool


class RequestPlanner:
    """Draws request i's model and lengths from the seed alone, so runs repeat exactly."""

    def __init__(self, config: LoadConfig):
        self.config = config
        self.models = config.model_names()
        self._cum_weights = list(itertools.accumulate(zipf_weights(len(self.models), config.zipf_alpha)))
        self._rng = random.Random(config.seed)
        self._limit = None if config.requests is None else config.warmup + config.requests
        self.issued = 0

    def next(self) -> PlannedRequest | None:
        if self._limit is not None and self.issued >= self._limit:
            return None
        index, rng = self.issued, self._rng
        self.issued += 1
        model = rng.choices(self.models, cum_weights=self._cum_weights)[0]
        prompt_words = self.config.prompt_tokens.draw(rng)  # type: ignore[union-attr]
        max_tokens = self.config.output_tokens.draw(rng)  # type: ignore[union-attr]
        prompt = " ".join(rng.choices(WORDS, k=prompt_words))
        return PlannedRequest(index, model, prompt, prompt_words, max_tokens, index < self.config.warmup)


def _request_body(config: LoadConfig, planned: PlannedRequest) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": planned.model,
        "max_tokens": planned.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    } | config.extra_body
    if config.endpoint == "chat":
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": planned.prompt}]}
    return "/v1/completions", body | {"prompt": planned.prompt}


def _chunk_text(payload: dict[str, Any], chat: bool) -> str:
    choices = payload.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def _error_message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return body[:200].decode("utf-8", "replace")


async def _send(
    client: aiohttp.ClientSession,
    config: LoadConfig,
    planned: PlannedRequest,
    run_t0: float,
    scheduled_s: float | None = None,
) -> RequestRecord:
    record = RequestRecord(
        planned.index, planned.model, planned.warmup, planned.prompt_words, planned.max_tokens, scheduled_s=scheduled_s
    )
    path, body = _request_body(config, planned)
    sent = time.perf_counter()
    record.start_s = sent - run_t0
    finished: float | None = None
    try:
        async with asyncio.timeout(config.timeout):
            async with client.post(path, data=orjson.dumps(body)) as response:
                record.status = response.status
                if response.status != 200:
                    record.error_kind = str(response.status)
                    record.error = f"HTTP {response.status}: {_error_message(await response.read())}"
                else:
                    finished = await _read_stream(response, record, sent, config.endpoint == "chat")
    except TimeoutError:
        record.error_kind, record.error = "timeout", f"no complete answer within --timeout {config.timeout:g} s"
    except aiohttp.ClientError as exc:
        record.error_kind, record.error = "connection", f"{type(exc).__name__}: {exc}"
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # one odd answer must not end the run
        record.error_kind, record.error = "protocol", f"unreadable answer: {type(exc).__name__}: {exc}"
    end = finished or time.perf_counter()
    record.end_s, record.latency_s = end - run_t0, end - sent
    return record


async def _read_stream(
    response: aiohttp.ClientResponse, record: RequestRecord, sent: float, chat: bool
) -> float | None:
    """Parse the SSE stream into `record`; return when `data: [DONE]` arrived."""
    done_at: float | None = None
    last_content: float | None = None
    content_chunks = 0
    # Read to the end even after [DONE]: a half-read response cannot go back to the pool.
    async for line in response.content:
        if done_at is not None or not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done_at = time.perf_counter()
            continue
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            record.error_kind, record.error = (
                "protocol",
                f"an SSE event is not JSON: {data[:80].decode(errors='replace')!r}",
            )
            continue
        if not isinstance(payload, dict):
            continue
        if payload.get("error") is not None:
            error = payload["error"]
            record.error_kind = "stream_error"
            record.error = str(error.get("message", error) if isinstance(error, dict) else error)
            continue
        if _chunk_text(payload, chat):
            now = time.perf_counter()
            if last_content is None:
                record.ttft_s = now - sent
            else:
                record.itl_s.append(now - last_content)
            last_content = now
            content_chunks += 1
        usage = payload.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            record.output_tokens, record.tokens_from_usage = int(usage["completion_tokens"]), True
            record.usage_prompt_tokens = usage.get("prompt_tokens")
    if not record.tokens_from_usage:
        record.output_tokens = content_chunks
    if done_at is None and record.error is None:
        record.error_kind, record.error = "incomplete", "the stream ended without data: [DONE]"
    return done_at


async def _closed_loop(
    client: aiohttp.ClientSession, config: LoadConfig, planner: RequestPlanner, run_t0: float
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    deadline = None if config.duration is None else run_t0 + config.duration

    async def worker() -> None:
        while deadline is None or time.perf_counter() < deadline:
            planned = planner.next()
            if planned is None:
                return
            records.append(await _send(client, config, planned, run_t0))

    await asyncio.gather(*(worker() for _ in range(config.concurrency or 1)))
    return records


async def _open_loop(
    client: aiohttp.ClientSession, config: LoadConfig, planner: RequestPlanner, run_t0: float
) -> list[RequestRecord]:
    # A separate generator, so that request i is the same request in open and closed runs.
    arrivals = random.Random(f"arrivals:{config.seed}")
    slots = asyncio.Semaphore(config.max_in_flight)
    tasks: list[asyncio.Task[RequestRecord]] = []
    scheduled_s = 0.0

    async def send_then_free(planned: PlannedRequest, at: float) -> RequestRecord:
        try:
            return await _send(client, config, planned, run_t0, scheduled_s=at)
        finally:
            slots.release()

    while True:
        scheduled_s += arrivals.expovariate(config.rate or 1.0)
        if config.duration is not None and scheduled_s >= config.duration:
            break
        planned = planner.next()
        if planned is None:
            break
        await asyncio.sleep(max(0.0, run_t0 + scheduled_s - time.perf_counter()))
        # At --max-in-flight, arrivals wait; start_s - scheduled_s shows it. A run whose server holds
        # every slot past --duration ends there; a client that merely fell behind its schedule still
        # sends each arrival scheduled inside it, and the lag is in start_lag.
        waited = slots.locked()
        await slots.acquire()
        if waited and config.duration is not None and time.perf_counter() - run_t0 >= config.duration:
            slots.release()
            break
        tasks.append(asyncio.create_task(send_then_free(planned, scheduled_s)))
    return list(await asyncio.gather(*tasks))


async def run_load(config: LoadConfig) -> RunResult:
    """Run the load `config` describes and summarize it.

    The client is aiohttp: with 32 connections httpx spent two thirds of this process's time in its
    connection pool (py-spy, docs/benchmarks.md), CPU that the server under test then lacks on a
    small machine.
    """
    pool_size = config.max_in_flight if config.open_loop else (config.concurrency or 1)
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    base_url = re.sub(r"/v1/?$", "", config.url.rstrip("/"))
    planner = RequestPlanner(config)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    async with aiohttp.ClientSession(
        base_url=base_url,
        headers=headers,
        connector=aiohttp.TCPConnector(limit=pool_size),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.timeout),  # asyncio.timeout bounds each request
    ) as client:
        run_t0 = time.perf_counter()
        loop = _open_loop if config.open_loop else _closed_loop
        records = sorted(await loop(client, config, planner, run_t0), key=lambda record: record.index)
        wall_s = time.perf_counter() - run_t0
    return RunResult(config, records, summarize(records), started_at, wall_s)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summarize(records: list[RequestRecord] | list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput and latency of the measured (non-warmup) requests; latencies of successful ones."""
    known = {f.name for f in fields(RequestRecord)}
    rows = [
        r if isinstance(r, RequestRecord) else RequestRecord(**{k: v for k, v in r.items() if k in known})
        for r in records
    ]
    measured = [r for r in rows if not r.warmup]
    succeeded = [r for r in measured if r.ok]
    # The window runs from the first measured send to the last measured answer.
    window_s = max(r.end_s for r in measured) - min(r.start_s for r in measured) if measured else 0.0
    output_tokens = sum(r.output_tokens for r in succeeded)
    latencies = [r.latency_s for r in succeeded if r.latency_s is not None]
    ttfts = [r.ttft_s for r in succeeded if r.ttft_s is not None]
    gaps = [gap for r in succeeded for gap in r.itl_s]
    lags = [r.start_s - r.scheduled_s for r in measured if r.scheduled_s is not None]
    summary: dict[str, Any] = {
        "requests": len(measured),
        "warmup_requests": len(rows) - len(measured),
        "succeeded": len(succeeded),
        "errors": len(measured) - len(succeeded),
        "errors_by_status": dict(sorted(Counter(str(r.error_kind) for r in measured if not r.ok).items())),
        "duration_s": round(window_s, 3),
        "req_per_s": round(len(succeeded) / window_s, 3) if window_s > 0 else None,
        "output_tokens": output_tokens,
        "output_tok_per_s": round(output_tokens / window_s, 3) if window_s > 0 else None,
    }
    for name, values, quantiles in (
        ("latency", latencies, PERCENTILES),
        ("ttft", ttfts, PERCENTILES),
        ("itl", gaps, (50, 99)),
    ):
        for q in quantiles:
            summary[f"{name}_p{q}_ms"] = _ms(percentile(values, q))
    summary["start_lag_p99_ms"] = _ms(percentile(lags, 99))
    return summary


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_summary(summary: dict[str, Any], label: str = "") -> str:
    s = summary
    errors = f"  by status {s['errors_by_status']}" if s["errors"] else ""
    lines = [
        f"run          {label or '(no --label)'}",
        f"requests     {s['requests']} measured ({s['warmup_requests']} warmup excluded), "
        f"{s['succeeded']} succeeded, {s['errors']} errors{errors}",
        f"throughput   {_fmt(s['req_per_s'], 2)} req/s, {_fmt(s['output_tok_per_s'])} output tok/s "
        f"({s['output_tokens']} tokens in {_fmt(s['duration_s'], 2)} s)",
    ]
    for title, name, quantiles in (
        ("latency ms", "latency", PERCENTILES),
        ("TTFT ms", "ttft", PERCENTILES),
        ("ITL ms", "itl", (50, 99)),
    ):
        lines.append(f"{title:<13}" + "  ".join(f"p{q} {_fmt(s[f'{name}_p{q}_ms'])}" for q in quantiles))
    if s.get("start_lag_p99_ms") is not None:
        lines.append(f"start lag    p99 {_fmt(s['start_lag_p99_ms'])} ms behind the Poisson schedule")
    return "\n".join(lines)


_COMPARED = (
    ("requests", "requests"),
    ("errors", "errors"),
    ("req/s", "req_per_s"),
    ("output tok/s", "output_tok_per_s"),
    *((f"latency p{q} ms", f"latency_p{q}_ms") for q in PERCENTILES),
    *((f"TTFT p{q} ms", f"ttft_p{q}_ms") for q in PERCENTILES),
    ("ITL p50 ms", "itl_p50_ms"),
    ("ITL p99 ms", "itl_p99_ms"),
)
_RATIOS = (
    ("req/s", "req_per_s"),
    ("output tok/s", "output_tok_per_s"),
    ("latency p99", "latency_p99_ms"),
    ("TTFT p99", "ttft_p99_ms"),
)


def load_run(path: Path) -> tuple[str, dict[str, Any]]:
    """The label and summary of a --json file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return str(data.get("label") or Path(path).stem), data["summary"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--compare: {path} is not a loadgen --json file ({type(exc).__name__}: {exc})") from None


def format_comparison(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """Summaries side by side, then each run's ratios to the first run."""
    header = ["", *(label for label, _ in runs)]
    rows = [[title, *(_fmt(summary.get(key)) for _, summary in runs)] for title, key in _COMPARED]
    first = runs[0][1]
    for title, key in _RATIOS:
        cells = []
        for _, summary in runs:
            base, value = first.get(key), summary.get(key)
            cells.append(f"{value / base:.2f}x" if base and value is not None else "-")
        rows.append([f"{title} vs first", *cells])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=False))
        )

    return "\n".join([render(header), *(render(row) for row in rows)])


def write_json(result: RunResult, path: Path) -> None:
    Path(path).write_bytes(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2))


def write_plot(result: RunResult, path: Path) -> None:
    """Latency CDF, TTFT histogram and latency over time, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in result.records if not r.warmup]
    succeeded = [r for r in measured if r.ok and r.latency_s is not None]
    latencies = sorted((r.latency_s or 0) * 1000 for r in succeeded)
    ttfts = [r.ttft_s * 1000 for r in succeeded if r.ttft_s is not None]
    failed = [r for r in measured if not r.ok]
    fig, (cdf, hist, timeline) = plt.subplots(1, 3, figsize=(16, 4.5))
    cdf.plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], drawstyle="steps-post")
    cdf.set(title="end-to-end latency CDF", xlabel="ms", ylabel="share of requests", ylim=(0, 1.02))
    hist.hist(ttfts, bins=30)
    hist.set(title="time to first token", xlabel="ms", ylabel="requests")
    timeline.scatter([r.start_s for r in succeeded], [(r.latency_s or 0) * 1000 for r in succeeded], s=6, label="ok")
    if failed:
        timeline.scatter(
            [r.start_s for r in failed],
            [(r.latency_s or 0) * 1000 for r in failed],
            s=12,
            marker="x",
            color="red",
            label=f"errors ({len(failed)})",
        )
    timeline.set(title="latency by start time", xlabel="seconds into the run", ylabel="ms")
    timeline.legend()
    for axes in (cdf, hist, timeline):
        axes.grid(alpha=0.3)
    s = result.summary
    fig.suptitle(
        f"{result.config.label or 'loadgen'}: {_fmt(s['req_per_s'], 2)} req/s, "
        f"{_fmt(s['output_tok_per_s'])} tok/s, p99 {_fmt(s['latency_p99_ms'])} ms"
    )
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _length_arg(text: str) -> LengthSpec:
    try:
        return LengthSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadgen",
        description="Stream completions at an OpenAI-compatible server and report throughput, latency, "
        "time to first token and inter-token latency.",
    )
    add = parser.add_argument
    add(
        "--url",
        default="http://127.0.0.1:8000",
        help="server address; a trailing /v1 is dropped (default: %(default)s)",
    )
    add(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="POST /v1/completions (text) or /v1/chat/completions (delta.content) (default: %(default)s)",
    )
    add("--api-key", help="sent as 'Authorization: Bearer KEY'; never written to --json")
    models = parser.add_argument_group("models (rank 1 is the most popular)")
    models.add_argument(
        "--models", type=_names, default=[], metavar="A,B,...", help="every model name, in popularity order"
    )
    models.add_argument("--base-model", metavar="NAME", help="the base model's served name")
    models.add_argument(
        "--adapters", type=_names, default=[], metavar="A,B,...", help="adapter names, in popularity order"
    )
    models.add_argument("--adapter-prefix", metavar="P", help="adapters named P0..P{N-1}, with --num-adapters N")
    models.add_argument("--num-adapters", type=int, metavar="N", help="how many adapters --adapter-prefix names")
    models.add_argument(
        "--include-base", action="store_true", help="also send requests to --base-model, ranked 1 ahead of the adapters"
    )
    models.add_argument(
        "--zipf-alpha",
        type=float,
        default=1.0,
        metavar="ALPHA",
        help="the model of rank k is drawn with probability proportional to k**-ALPHA; 0 is uniform "
        "(default: %(default)s)",
    )
    load = parser.add_argument_group("load (each run ends after --requests and/or --duration)")
    loop = load.add_mutually_exclusive_group()
    loop.add_argument(
        "--concurrency",
        type=int,
        metavar="C",
        help="closed loop: C workers, each sending its next request when its last one ends (default: 1)",
    )
    loop.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="open loop: Poisson arrivals at R requests/s, whatever the server's speed",
    )
    load.add_argument(
        "--max-in-flight",
        type=int,
        default=1000,
        metavar="M",
        help="open loop: arrivals wait while M requests are unanswered (default: %(default)s)",
    )
    load.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="measured requests to send, after the warmup (default: 100 unless --duration is given)",
    )
    load.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help=(
            "stop sending S seconds after the start (warmup included); answers in flight are awaited. "
            "The open loop sends every arrival scheduled before S, late if the client fell behind"
        ),
    )
    load.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="K",
        help="the first K requests are sent but left out of the summary (default: 0)",
    )
    load.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds a request may take from send to its last byte (default: %(default)s)",
    )
    shape = parser.add_argument_group("request shape (LEN: N, LO:HI uniform inclusive, or normal:MEAN:STD)")
    shape.add_argument(
        "--prompt-tokens",
        type=_length_arg,
        default=LengthSpec.parse("128"),
        metavar="LEN",
        help="prompt length in words drawn from a list of one-token English words (default: 128)",
    )
    shape.add_argument(
        "--output-tokens",
        type=_length_arg,
        default=LengthSpec.parse("128"),
        metavar="LEN",
        help="max_tokens of each request; the model may stop earlier at EOS (default: 128)",
    )
    shape.add_argument("--seed", type=int, default=0, help="seeds models, lengths, prompts and arrivals (default: 0)")
    shape.add_argument(
        "--extra-body",
        type=_json_object,
        default={},
        metavar="JSON",
        help="more fields for every request body, as a JSON object, e.g. '{\"ignore_eos\": true}' (default: none)",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--label", default="", help="the run's name in --json, --plot and --compare")
    out.add_argument("--json", type=Path, metavar="PATH", help="write {label, config, summary, records} as JSON")
    out.add_argument(
        "--plot",
        type=Path,
        metavar="PATH.png",
        help="draw latency CDF, TTFT histogram and latency over time (needs matplotlib)",
    )
    out.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        metavar="RUN.json",
        help="send nothing: print the summaries of these --json files side by side, with ratios to the first",
    )
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError("--extra-body takes a JSON object") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body takes a JSON object")
    return value


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    names = {f.name for f in fields(LoadConfig)}
    return LoadConfig(**{key: value for key, value in vars(args).items() if key in names})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        try:
            print(format_comparison([load_run(path) for path in args.compare]))
        except ValueError as exc:
            parser.error(str(exc))
        return 0
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{flag}: folder {path.parent} does not exist")
    mode = f"rate {config.rate:g} req/s" if config.open_loop else f"concurrency {config.concurrency}"
    bound = " and ".join(
        filter(None, [config.requests and f"{config.requests} requests", config.duration and f"{config.duration:g} s"])
    )
    path = "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
    print(
        f"loadgen: {config.url} {path}, {len(config.model_names())} models, {mode}, "
        f"up to {bound}, plus {config.warmup} warmup",
        file=sys.stderr,
    )
    result = asyncio.run(run_load(config))
    print(format_summary(result.summary, config.label))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        write_plot(result, args.plot)
    return 0 if result.summary["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())

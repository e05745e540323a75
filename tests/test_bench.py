"""bench.loadgen against a small fake OpenAI server, served by uvicorn on a free port in a thread."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench.loadgen import (
    LengthSpec,
    LoadConfig,
    RequestPlanner,
    build_parser,
    main,
    run_load,
    summarize,
    write_plot,
    zipf_weights,
)


@dataclass
class FakeOpenAI:
    """Streams max_tokens one-token chunks; records models, paths and requests in flight.

    Model names choose misbehaviour: `broken` answers 500, `midfail` sends an error event after
    one token, `nousage` leaves out the usage chunk, `hang` waits 2 s before answering.
    """

    token_delay: float = 0.002
    first_delay: float = 0.0
    models: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""

    def reset(self, token_delay: float = 0.002, first_delay: float = 0.0) -> None:
        self.token_delay, self.first_delay = token_delay, first_delay
        self.models, self.paths = [], []
        self.in_flight = self.max_in_flight = 0

    async def handle(self, request: Request) -> Response:
        body = await request.json()
        model, chat = body["model"], request.url.path.endswith("/chat/completions")
        self.models.append(model)
        self.paths.append(request.url.path)
        if model == "broken":
            return JSONResponse({"error": {"message": "model broken is broken", "code": "x"}}, status_code=500)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return StreamingResponse(
            self._events(model, chat, body["max_tokens"], include_usage), media_type="text/event-stream"
        )

    async def _events(self, model: str, chat: bool, count: int, include_usage: bool):
        def event(payload: object) -> bytes:
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        def chunk(text: str) -> bytes:
            choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
            return event({"object": "chunk", "model": model, "choices": [choice]})

        try:
            if model == "hang":
                await asyncio.sleep(2)
            if chat:
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(self.first_delay)
            for i in range(count):
                await asyncio.sleep(self.token_delay)
                if model == "midfail" and i == 1:
                    yield event({"error": {"message": "engine died", "type": "server_error"}})
                    break
                yield chunk(f"t{i} ")
            if include_usage and model != "nousage":
                yield event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": count}})
            yield b"data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    routes = [Route(path, fake.handle, methods=["POST"]) for path in ("/v1/completions", "/v1/chat/completions")]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=routes), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.02)
    yield fake
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def fake(fake_server: FakeOpenAI) -> FakeOpenAI:
    fake_server.reset()
    return fake_server


def config(fake: FakeOpenAI, **overrides) -> LoadConfig:
    values = {"url": fake.url, "models": ["a", "b"], "prompt_tokens": "4", "output_tokens": "3", "requests": 10}
    return LoadConfig(**(values | overrides))


async def test_counts_tokens_and_latencies_from_the_stream(fake):
    fake.reset(token_delay=0.01, first_delay=0.03)
    result = await run_load(config(fake, requests=6, concurrency=2, output_tokens="5"))
    assert [r.index for r in result.records] == list(range(6))
    assert Counter(fake.models) == Counter(r.model for r in result.records)
    assert all(r.ok and r.status == 200 and r.tokens_from_usage for r in result.records)
    assert all(r.output_tokens == 5 and r.usage_prompt_tokens == 7 and len(r.itl_s) == 4 for r in result.records)
    # The fake sleeps 0.03 s, then 0.01 s before each token: lower bounds, whatever the machine's load
    # (a late first chunk can arrive with the next, so the gap between TTFT and the end is no bound).
    assert all(r.ttft_s >= 0.035 and r.latency_s >= 0.075 for r in result.records)
    summary = result.summary
    assert (summary["requests"], summary["succeeded"], summary["errors"], summary["output_tokens"]) == (6, 6, 0, 30)
    # lower bounds only: the fake sleeps at least this long, and a busy machine only adds time
    assert summary["ttft_p50_ms"] >= 35 and summary["itl_p50_ms"] >= 5
    assert summary["latency_p50_ms"] <= summary["latency_p90_ms"] <= summary["latency_p99_ms"]
    assert summary["req_per_s"] == pytest.approx(6 / summary["duration_s"], rel=0.01)


async def test_output_tokens_fall_back_to_content_chunks_without_usage(fake):
    result = await run_load(config(fake, models=["nousage"], requests=2, output_tokens="4"))
    assert [(r.output_tokens, r.tokens_from_usage) for r in result.records] == [(4, False), (4, False)]


async def test_chat_endpoint_reads_delta_content(fake):
    result = await run_load(config(fake, endpoint="chat", requests=3))
    assert fake.paths == ["/v1/chat/completions"] * 3
    # the role-only first chunk has empty content, so it is not the first token
    assert all(r.ok and r.output_tokens == 3 and len(r.itl_s) == 2 for r in result.records)


async def test_errors_are_counted_by_status(fake):
    result = await run_load(config(fake, models=["ok", "broken", "midfail"], zipf_alpha=0, requests=30, concurrency=3))
    by_model = Counter(r.model for r in result.records)
    assert Counter(fake.models) == by_model
    assert by_model["broken"] > 0 and by_model["midfail"] > 0 and by_model["ok"] > 0
    summary = result.summary
    assert summary["errors"] == by_model["broken"] + by_model["midfail"]
    assert summary["succeeded"] == by_model["ok"]
    assert summary["errors_by_status"] == {"500": by_model["broken"], "stream_error": by_model["midfail"]}
    broken = next(r for r in result.records if r.model == "broken")
    assert (broken.status, broken.error) == (500, "HTTP 500: model broken is broken")
    assert summarize(result.records) == summary


async def test_timeouts_and_refused_connections_are_errors(fake):
    result = await run_load(config(fake, models=["hang"], requests=1, timeout=0.3))
    (record,) = result.records
    assert record.error_kind == "timeout" and 0.3 <= record.latency_s < 1.0
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    result = await run_load(config(fake, url=url, requests=2))
    assert result.summary["errors_by_status"] == {"connection": 2}


async def test_warmup_requests_are_sent_but_not_counted(fake):
    result = await run_load(config(fake, warmup=4, requests=10, concurrency=2))
    assert len(fake.models) == 14
    assert [r.warmup for r in result.records] == [True] * 4 + [False] * 10
    assert (result.summary["requests"], result.summary["warmup_requests"]) == (10, 4)


def most_overlapping(records) -> int:
    """The most requests whose send-to-answer intervals overlap, on the client's clock."""
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    return max(itertools.accumulate(change for _, change in events))


async def test_closed_loop_keeps_exactly_concurrency_in_flight(fake):
    fake.reset(token_delay=0.005)
    result = await run_load(config(fake, concurrency=4, requests=24, output_tokens="4"))
    assert len(fake.models) == 24
    assert fake.max_in_flight == 4
    assert most_overlapping(result.records) == 4


async def test_duration_bounds_the_closed_loop(fake):
    fake.reset(token_delay=0.005)
    result = await run_load(config(fake, concurrency=2, requests=None, duration=0.4))
    assert result.records and all(r.start_s < 0.4 for r in result.records)
    assert result.wall_s < 1.5


async def test_open_loop_sends_poisson_arrivals_at_the_rate(fake):
    fake.reset(token_delay=0.02)  # 0.1 s per request: requests overlap when the loop is open
    # A busy machine stalls the client mid-run; the arrivals it missed still go out, late.
    asyncio.get_running_loop().call_later(0.3, time.sleep, 0.8)
    result = await run_load(config(fake, rate=40, requests=None, duration=1.0, output_tokens="5"))
    sent = len(result.records)
    assert 25 <= sent <= 55  # 40 expected; Poisson sd ~6.3
    assert len(fake.models) == sent
    starts = [r.scheduled_s for r in result.records]
    assert starts == sorted(starts) and starts[-1] < 1.0
    gaps = [b - a for a, b in zip([0.0, *starts], starts, strict=False)]
    assert 0.015 < sum(gaps) / len(gaps) < 0.04 and max(gaps) > 2 * min(gaps)
    assert fake.max_in_flight >= 3
    assert all(r.start_s >= r.scheduled_s for r in result.records)


async def test_open_loop_waits_at_max_in_flight(fake):
    fake.reset(token_delay=0.01)
    result = await run_load(config(fake, rate=500, requests=20, max_in_flight=3))
    assert len(result.records) == 20 and fake.max_in_flight == 3
    assert most_overlapping(result.records) == 3


def draw_models(count: int, **overrides) -> Counter[str]:
    planner = RequestPlanner(LoadConfig(**({"prompt_tokens": "1", "requests": count, "seed": 3} | overrides)))
    return Counter(planner.next().model for _ in range(count))


def test_zipf_weights_follow_the_rule():
    assert zipf_weights(4, 1.0) == pytest.approx([0.48, 0.24, 0.16, 0.12])
    assert zipf_weights(3, 0.0) == pytest.approx([1 / 3] * 3)
    assert zipf_weights(2, 2.0) == pytest.approx([0.8, 0.2])


def test_zipf_draws_favour_rank_one():
    counts = draw_models(5000, adapters=["r1", "r2", "r3", "r4"], zipf_alpha=1.0)
    shares = [counts[name] / 5000 for name in ("r1", "r2", "r3", "r4")]
    assert shares == pytest.approx([0.48, 0.24, 0.16, 0.12], abs=0.03)
    assert shares == sorted(shares, reverse=True)


def test_zipf_alpha_zero_is_uniform():
    counts = draw_models(5000, adapter_prefix="lora", num_adapters=4, zipf_alpha=0)
    assert sorted(counts) == ["lora0", "lora1", "lora2", "lora3"]
    assert [counts[f"lora{i}"] / 5000 for i in range(4)] == pytest.approx([0.25] * 4, abs=0.03)


def test_the_base_model_is_rank_one_when_included():
    counts = draw_models(5000, base_model="base", adapters=["x", "y"], include_base=True)
    assert counts.most_common(1)[0][0] == "base"
    assert counts["base"] / 5000 == pytest.approx(1 / (1 + 1 / 2 + 1 / 3), abs=0.03)
    assert "base" not in draw_models(200, base_model="base", adapters=["x", "y"])


def test_a_seed_repeats_the_same_requests():
    def plans(seed: int) -> list[tuple]:
        planner = RequestPlanner(
            LoadConfig(models=["a", "b", "c"], prompt_tokens="2:9", output_tokens="normal:8:3", requests=20, seed=seed)
        )
        return [(p.model, p.prompt, p.max_tokens) for p in iter(planner.next, None)]

    assert len(plans(1)) == 20 and plans(1) == plans(1) and plans(1) != plans(2)


def test_length_specs_parse_and_draw():
    rng = random.Random(0)
    assert LengthSpec.parse("16").draw(rng) == 16
    uniform = [LengthSpec.parse("8:32").draw(rng) for _ in range(2000)]
    assert min(uniform) == 8 and max(uniform) == 32
    normal = [LengthSpec.parse("normal:20:5").draw(rng) for _ in range(2000)]
    assert sum(normal) / len(normal) == pytest.approx(20, abs=0.5) and min(normal) >= 1
    assert [str(LengthSpec.parse(text)) for text in ("16", "8:32", "normal:20:5")] == ["16", "8:32", "normal:20:5"]
    assert min(LengthSpec.parse("normal:2:10").draw(rng) for _ in range(200)) == 1


@pytest.mark.parametrize("bad", ["abc", "", "0", "32:8", "0:4", "1:2:3", "normal:20", "normal:0:5", "normal:20:-1"])
def test_bad_length_specs_are_argparse_errors(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--output-tokens", bad])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument --output-tokens:" in error and repr(bad) in error


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--include-base", "--adapters", "a"], "--include-base needs --base-model"),
        (["--models", "a", "--adapters", "b"], "--models names every model"),
        (["--adapter-prefix", "p"], "--adapter-prefix and --num-adapters go together"),
        (["--models", "a,b,a"], "repeated: a"),
        (["--models", "a", "--concurrency", "2", "--rate", "3"], "not allowed with"),
        (["--models", "a", "--rate", "0"], "--rate must be a positive number"),
        (["--models", "a", "--zipf-alpha", "-1"], "--zipf-alpha must be >= 0"),
        ([], "no models to call"),
    ],
)
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_every_load_config_field_has_a_flag():
    flags = set(vars(build_parser().parse_args([]))) - {"json", "plot", "compare"}
    assert flags == {f.name for f in fields(LoadConfig)}


def test_cli_prints_the_summary_and_writes_json(fake, tmp_path, capsys):
    path = tmp_path / "run.json"
    argv = [
        "--url",
        fake.url + "/v1",
        "--models",
        "a,b",
        "--requests",
        "5",
        "--concurrency",
        "2",
        "--output-tokens",
        "3",
        "--prompt-tokens",
        "8:12",
        "--api-key",
        "sk-secret",
        "--label",
        "first",
        "--json",
        str(path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "5 measured" in out and "TTFT ms" in out and "ITL ms" in out
    data = json.loads(path.read_text())
    assert data["label"] == "first" and data["config"]["api_key"] == "***"
    assert data["config"]["prompt_tokens"] == "8:12" and data["config"]["model_names"] == ["a", "b"]
    assert len(data["records"]) == 5 and all(8 <= r["prompt_words"] <= 12 for r in data["records"])
    for key in (
        "requests",
        "errors",
        "errors_by_status",
        "req_per_s",
        "output_tok_per_s",
        "latency_p50_ms",
        "latency_p90_ms",
        "latency_p99_ms",
        "ttft_p50_ms",
        "ttft_p90_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
    ):
        assert data["summary"][key] is not None, key
    assert summarize(data["records"]) == data["summary"]


def test_compare_prints_ratios_to_the_first_run(tmp_path, capsys):
    paths = []
    for label, rate, p99 in (("before", 10.0, 200.0), ("after", 25.0, 50.0)):
        paths.append(tmp_path / f"{label}.json")
        paths[-1].write_text(json.dumps({"label": label, "summary": {"req_per_s": rate, "latency_p99_ms": p99}}))
    assert main(["--compare", *map(str, paths)]) == 0
    rows = {line.split("  ")[0].strip(): line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows[""] == ["before", "after"]
    assert rows["req/s vs first"][-2:] == ["1.00x", "2.50x"]
    assert rows["latency p99 vs first"][-2:] == ["1.00x", "0.25x"]
    (tmp_path / "junk.json").write_text("[]")
    with pytest.raises(SystemExit):
        main(["--compare", str(paths[0]), str(tmp_path / "junk.json")])
    assert "junk.json is not a loadgen --json file" in capsys.readouterr().err


async def test_plot_writes_a_png(fake, tmp_path):
    pytest.importorskip("matplotlib")
    result = await run_load(config(fake, models=["ok", "broken"], requests=8, label="plot"))
    write_plot(result, tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""/metrics, X-Request-ID and the request log, over the FakeEngine app."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.database import Database
from adapters.registry import Registry
from adapters.spec import SHARED
from server.app import build_app
from server.config import Settings
from server.ops.logs import JsonFormatter, configure_logging
from server.ops.metrics import GatewayMetrics
from tests.conftest import ADMIN_KEY, full_gateway
from tests.fakes import FakeEngine, fake_spec

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def complete(model: str, prompt: str = "hi", max_tokens: int = 5, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, **extra}


@dataclass
class Observed:
    client: httpx.AsyncClient
    engine: FakeEngine
    registry: Registry
    metrics: GatewayMetrics


@asynccontextmanager
async def observed_gateway(tmp_path, *, adapters: list[str], max_resident: int, labels: int) -> AsyncIterator[Observed]:
    """The FakeEngine app with its registry's events counted, as cli.serve wires them."""
    settings = Settings(
        served_model_name="base",
        max_cpu_loras=max_resident,
        max_loras=1,
        state_dir=tmp_path,
        metrics_adapter_labels=labels,
    )
    engine = FakeEngine(cache_size=max_resident + 1)
    metrics = GatewayMetrics("base", settings.metrics_adapter_labels)
    registry = Registry(
        engine,
        base_name="base",
        base_adapter=fake_spec("__base__", 1),
        max_resident=max_resident,
        catalog=Database(tmp_path / "catalog.sqlite3"),
        events=metrics.events,
    )
    app = build_app(settings, engine, registry, metrics=metrics)
    async with app.router.lifespan_context(app):
        for name in adapters:
            await registry.register(SHARED, name, fake_spec(name), load=True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            yield Observed(client, engine, registry, metrics)
    registry.catalog.close()


# ---------------------------------------------------------------- counters and histograms


async def test_a_completion_moves_each_series_by_exactly_its_amount(gateway):
    before = await scrape(gateway.client)
    response = await gateway.client.post("/v1/completions", json=complete("alpha", "hi", 5))
    assert response.status_code == 200
    after = await scrape(gateway.client)

    assert (
        delta(before, after, "lora_gateway_requests_total", adapter="alpha", endpoint="completions", status="200") == 1
    )
    assert delta(before, after, "lora_gateway_prompt_tokens_total", adapter="alpha") == len(gateway.engine.encode("hi"))
    assert delta(before, after, "lora_gateway_generation_tokens_total", adapter="alpha") == 5
    assert (
        delta(before, after, "lora_gateway_request_duration_seconds_count", adapter="alpha", endpoint="completions")
        == 1
    )
    # Not streamed: its tokens arrive at once, so no first-token or per-token time is claimed.
    assert (
        delta(before, after, "lora_gateway_time_to_first_token_seconds_count", adapter="alpha", endpoint="completions")
        == 0
    )
    assert value(after, "lora_gateway_requests_in_flight") == 0
    # The scrape itself is not a request the counter counts.
    assert not any(
        name == "lora_gateway_requests_total" and ("endpoint", "/metrics") in labels for name, labels in after
    )


async def test_a_stream_is_measured_to_its_end(gateway):
    messages = [{"role": "user", "content": "Who are you?"}]
    before = await scrape(gateway.client)
    response = await gateway.client.post(
        "/v1/chat/completions", json={"model": "beta", "messages": messages, "max_tokens": 4, "stream": True}
    )
    assert response.status_code == 200
    assert response.text.rstrip().endswith("data: [DONE]")
    after = await scrape(gateway.client)

    labels = {"adapter": "beta", "endpoint": "chat"}
    assert delta(before, after, "lora_gateway_requests_total", status="200", **labels) == 1
    assert delta(before, after, "lora_gateway_prompt_tokens_total", adapter="beta") == len(
        gateway.engine.render_chat(messages)
    )
    assert delta(before, after, "lora_gateway_generation_tokens_total", adapter="beta") == 4
    assert delta(before, after, "lora_gateway_request_duration_seconds_count", **labels) == 1
    assert delta(before, after, "lora_gateway_time_to_first_token_seconds_count", **labels) == 1
    assert delta(before, after, "lora_gateway_time_per_output_token_seconds_count", **labels) == 1
    ttft = delta(before, after, "lora_gateway_time_to_first_token_seconds_sum", **labels)
    latency = delta(before, after, "lora_gateway_request_duration_seconds_sum", **labels)
    assert 0 < ttft <= latency


async def test_errors_are_counted_with_their_status(gateway):
    before = await scrape(gateway.client)
    assert (await gateway.client.post("/v1/completions", json=complete("nope"))).status_code == 404
    assert (await gateway.client.post("/v1/completions", json=complete("alpha", best_of=2))).status_code == 400
    assert (await gateway.client.post("/v1/completions", json=complete("alpha"))).status_code == 200
    too_long = complete("alpha", max_tokens=10_000)
    assert (await gateway.client.post("/v1/completions", json=too_long)).status_code == 400
    assert (await gateway.client.get("/v1/no-such-route")).status_code == 404
    after = await scrape(gateway.client)

    requests = "lora_gateway_requests_total"
    # A made-up name never gets a label of its own.
    assert delta(before, after, requests, adapter="other", endpoint="completions", status="404") == 1
    # The body was refused before its model was read.
    assert delta(before, after, requests, adapter="none", endpoint="completions", status="400") == 1
    assert delta(before, after, requests, adapter="alpha", endpoint="completions", status="400") == 1
    assert delta(before, after, requests, adapter="alpha", endpoint="completions", status="200") == 1
    assert delta(before, after, requests, adapter="none", endpoint="unmatched", status="404") == 1
    assert not any(dict(labels).get("adapter") == "nope" for _, labels in after)
    # Failed requests stay out of the latency histogram.
    assert (
        delta(before, after, "lora_gateway_request_duration_seconds_count", adapter="alpha", endpoint="completions")
        == 1
    )


async def test_probes_are_not_counted(gateway):
    for path in ("/health", "/ready", "/metrics"):
        assert (await gateway.client.get(path)).status_code == 200
    samples = await scrape(gateway.client)
    assert not [key for key in samples if key[0] == "lora_gateway_requests_total"]


async def test_requests_in_flight(gateway):
    gateway.engine.release = asyncio.Event()
    pending = asyncio.create_task(gateway.client.post("/v1/completions", json=complete("alpha")))
    while gateway.engine.running == 0:
        await asyncio.sleep(0.01)
    assert value(await scrape(gateway.client), "lora_gateway_requests_in_flight") == 1
    gateway.engine.release.set()
    assert (await pending).status_code == 200
    assert value(await scrape(gateway.client), "lora_gateway_requests_in_flight") == 0


async def test_the_scrape_includes_the_default_registry(gateway):
    text = (await gateway.client.get("/metrics")).text
    # process_* and python_* come from prometheus_client's default REGISTRY, as vllm:* does.
    assert re.search(r"^python_info\{", text, re.M)
    assert re.search(r"^lora_gateway_adapters_registered 2\.0$", text, re.M)


async def test_two_apps_in_one_process_keep_their_own_series(gateway, tmp_path):
    async with observed_gateway(tmp_path, adapters=["alpha"], max_resident=2, labels=5) as other:
        assert (await other.client.post("/v1/completions", json=complete("alpha"))).status_code == 200
        mine = await scrape(gateway.client)
        theirs = await scrape(other.client)
    requests = {"adapter": "alpha", "endpoint": "completions", "status": "200"}
    assert value(theirs, "lora_gateway_requests_total", **requests) == 1
    assert value(mine, "lora_gateway_requests_total", **requests) == 0


# ---------------------------------------------------------------- the adapter label bound


async def test_adapter_label_bound(tmp_path):
    async with observed_gateway(tmp_path, adapters=["alpha", "beta"], max_resident=3, labels=1) as gw:
        for model in ("base", "alpha", "beta"):
            assert (await gw.client.post("/v1/completions", json=complete(model))).status_code == 200
        samples = await scrape(gw.client)
    requests = "lora_gateway_requests_total"
    assert value(samples, requests, adapter="base", endpoint="completions", status="200") == 1
    assert value(samples, requests, adapter="alpha", endpoint="completions", status="200") == 1
    assert value(samples, requests, adapter="other", endpoint="completions", status="200") == 1
    assert value(samples, "lora_gateway_adapter_loads_total", adapter="other") == 1
    assert not any(dict(labels).get("adapter") == "beta" for _, labels in samples)


async def test_unknown_names_do_not_use_up_the_bound(tmp_path):
    async with observed_gateway(tmp_path, adapters=["alpha", "beta"], max_resident=3, labels=3) as gw:
        for name in ("ghost-1", "ghost-2"):
            assert (await gw.client.post("/v1/completions", json=complete(name))).status_code == 404
        await gw.registry.register(SHARED, "gamma", fake_spec("gamma"), load=False)
        assert (await gw.client.post("/v1/completions", json=complete("gamma"))).status_code == 200
        samples = await scrape(gw.client)
    assert value(samples, "lora_gateway_requests_total", adapter="gamma", endpoint="completions", status="200") == 1
    assert value(samples, "lora_gateway_requests_total", adapter="other", endpoint="completions", status="404") == 2


# ---------------------------------------------------------------- registry events


async def test_loads_and_evictions_are_counted(tmp_path):
    async with observed_gateway(tmp_path, adapters=["alpha", "beta"], max_resident=1, labels=5) as gw:
        # Registering beta pushed alpha out of the cache; this request has the engine reload alpha,
        # which pushes beta out.
        assert (await gw.client.post("/v1/completions", json=complete("alpha"))).status_code == 200
        assert gw.engine.reloaded == [gw.registry.find("", "alpha").adapter_id]
        samples = await scrape(gw.client)
    assert value(samples, "lora_gateway_adapter_loads_total", adapter="alpha") == 1
    assert value(samples, "lora_gateway_adapter_loads_total", adapter="beta") == 1
    assert value(samples, "lora_gateway_adapter_reloads_total", adapter="alpha") == 1
    assert value(samples, "lora_gateway_adapter_evictions_total", adapter="alpha") == 1
    assert value(samples, "lora_gateway_adapter_evictions_total", adapter="beta") == 1
    assert value(samples, "lora_gateway_adapter_load_seconds_count") == 2
    assert value(samples, "lora_gateway_adapters_resident") == 1
    assert value(samples, "lora_gateway_adapters_registered") == 2


class BrokenEngine(FakeEngine):
    """Fails the way a bug would: not an error the gateway knows."""

    async def generate(self, request_id, prompt_token_ids, options, adapter):
        raise RuntimeError("boom")
        yield  # an async generator, like the real one


async def test_an_unexpected_error_is_a_counted_500_with_the_request_id(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    async with full_gateway(tmp_path / "state", engine=BrokenEngine()) as gw:
        response = await gw.client.post(
            "/v1/completions", json=complete("base"), headers=gw.admin | {"X-Request-ID": "bug-1"}
        )
        samples = await scrape(gw.client, gw.admin)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert response.headers["x-request-id"] == "bug-1"
    assert value(samples, "lora_gateway_requests_total", adapter="base", endpoint="completions", status="500") == 1
    assert value(samples, "lora_gateway_requests_in_flight") == 0
    (line,) = [r for r in request_lines(caplog) if r.request_id == "bug-1"]
    assert line.status == 500
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


# ---------------------------------------------------------------- X-Request-ID


async def test_a_given_request_id_is_echoed_on_every_response(gateway):
    for method, path, body, status in [
        ("POST", "/v1/completions", complete("alpha"), 200),
        ("POST", "/v1/completions", complete("alpha", stream=True), 200),
        ("POST", "/v1/completions", complete("nope"), 404),
        ("POST", "/v1/completions", {"model": "alpha"}, 400),
        ("GET", "/health", None, 200),
        ("GET", "/metrics", None, 200),
    ]:
        response = await gateway.client.request(method, path, json=body, headers={"X-Request-ID": "trace-42"})
        assert response.status_code == status, (path, response.text)
        assert response.headers.get_list("x-request-id") == ["trace-42"], path


async def test_a_request_id_is_made_when_none_or_an_unusable_one_is_given(gateway):
    ids = []
    for headers in ({}, {"X-Request-ID": "x" * 129}, {}):
        response = await gateway.client.post("/v1/completions", json=complete("alpha"), headers=headers)
        ids.append(response.headers["x-request-id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids), ids
    assert len(set(ids)) == 3


# ---------------------------------------------------------------- the request log


def request_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lora_gateway.requests"]


async def test_one_log_line_per_request_with_its_fields(gateway, caplog):
    caplog.set_level(logging.DEBUG, logger="lora_gateway.requests")
    response = await gateway.client.post(
        "/v1/completions", json=complete("alpha", "hi", 4, stream=True), headers={"X-Request-ID": "log-1"}
    )
    assert response.status_code == 200
    (line,) = request_lines(caplog)
    assert line.levelno == logging.INFO
    fields = {
        key: getattr(line, key)
        for key in (
            "request_id",
            "tenant",
            "adapter",
            "endpoint",
            "method",
            "path",
            "status",
            "prompt_tokens",
            "completion_tokens",
        )
    }
    assert fields == {
        "request_id": "log-1",
        "tenant": None,
        "adapter": "alpha",
        "endpoint": "completions",
        "method": "POST",
        "path": "/v1/completions",
        "status": 200,
        "prompt_tokens": len(gateway.engine.encode("hi")),
        "completion_tokens": 4,
    }
    assert 0 < line.ttft_ms <= line.latency_ms

    entry = json.loads(JsonFormatter().format(line))
    assert {"ts", "level", "logger", "message"} <= entry.keys()
    assert entry["level"] == "INFO" and entry["logger"] == "lora_gateway.requests"
    assert entry["request_id"] == "log-1" and entry["status"] == 200 and entry["ttft_ms"] == line.ttft_ms
    assert entry["message"].startswith("POST /v1/completions 200 alpha")


async def test_probes_are_logged_at_debug_only_and_ttft_only_for_streams(gateway, caplog):
    caplog.set_level(logging.DEBUG, logger="lora_gateway.requests")
    await gateway.client.get("/health")
    await gateway.client.post("/v1/completions", json=complete("nope"))
    await gateway.client.post("/v1/completions", json=complete("alpha", max_tokens=3))
    probe, failed, whole = request_lines(caplog)
    assert (probe.path, probe.levelno) == ("/health", logging.DEBUG)
    assert (failed.status, failed.adapter, failed.levelno, failed.ttft_ms) == (404, "nope", logging.INFO, None)
    # Not streamed: every token arrived at once, so no first-token time is claimed.
    assert (whole.status, whole.completion_tokens, whole.ttft_ms) == (200, 3, None)


async def test_keys_never_reach_the_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    wrong_key = "lgw-not-a-real-key-but-secret-0123456789"
    try:
        async with full_gateway(tmp_path / "state") as gw:
            created = await gw.client.post("/v1/tenants", json={"name": "acme"}, headers=gw.admin)
            assert created.status_code == 201
            tenant_key = created.json()["api_key"]
            for key, model, status in [
                (tenant_key, "base", 200),
                (tenant_key, "nope", 404),
                (ADMIN_KEY, "base", 200),
                (wrong_key, "base", 401),
            ]:
                response = await gw.client.post(
                    "/v1/completions", json=complete(model, stream=status == 200), headers=gw.as_(key)
                )
                assert response.status_code == status, response.text
            # /metrics names every tenant's adapters: a tenant's key is refused there (and not logged either).
            assert (await gw.client.get("/metrics", headers=gw.as_(tenant_key))).status_code == 403
    finally:
        root.removeHandler(handler)

    tenants = [r.tenant for r in request_lines(caplog) if r.path == "/v1/completions"]
    assert tenants == ["acme", "acme", None, None]
    logged = output.getvalue() + caplog.text + repr([vars(r) for r in caplog.records])
    assert "POST /v1/completions 200" in logged  # the capture did see the request lines
    for secret in (tenant_key, ADMIN_KEY, wrong_key):
        assert secret not in logged


# ---------------------------------------------------------------- configure_logging


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_configure_logging(capsys, fmt):  # tests/conftest.py restores the root logger after
    configure_logging("info", "text")
    configure_logging("warning", fmt)  # replaces the first handler rather than adding a second
    logging.getLogger("lora_gateway.test").info("hidden")
    logging.getLogger("lora_gateway.test").warning("shown %d", 7, extra={"adapter": "alpha"})
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    if fmt == "json":
        entry = json.loads(lines[0])
        assert entry["message"] == "shown 7" and entry["level"] == "WARNING"
        assert entry["logger"] == "lora_gateway.test" and entry["adapter"] == "alpha"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["ts"])
    else:
        assert lines[0].endswith("WARNING lora_gateway.test: shown 7")


def test_configure_logging_refuses_an_unknown_format():
    with pytest.raises(ValueError, match="json or text"):
        configure_logging("info", "xml")

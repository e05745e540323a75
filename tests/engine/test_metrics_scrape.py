"""/metrics of a real gateway: every series the dashboard queries, and vLLM's own, are there."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.conftest import ADMIN_KEY

pytestmark = pytest.mark.engine

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "lora-gateway.json"
METRIC_PREFIXES = ("lora_gateway_", "vllm:")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")
# Declared, but with no sample until it happens: two adapters never fill --max-cpu-loras 8.
# Evictions and reloads need more traffic; replica requests are recorded with --ray only (tests/ray).
NO_SAMPLE_YET = {
    "lora_gateway_adapter_evictions_total",
    "lora_gateway_adapter_reloads_total",
    "lora_gateway_replica_requests_total",
}
WHO = [{"role": "user", "content": "Who are you?"}]


def dashboard_metric_names() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert exprs
    names = set()
    for expr in exprs:
        # Label matchers and durations hold no metric names; strings could look like one.
        bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]', " ", expr)
        found = {token for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if token.startswith(METRIC_PREFIXES)}
        assert found, f"no lora_gateway_ or vllm: metric in {expr!r}"
        names |= found
    return names


class Scrape:
    def __init__(self, text: str):
        self.families = list(text_string_to_metric_families(text))
        self.family_names = {family.name for family in self.families}
        self.samples = [sample for family in self.families for sample in family.samples]
        self.sample_names = {sample.name for sample in self.samples}

    def declares(self, name: str) -> bool:
        family = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name)
        return name in self.family_names or family in self.family_names

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())


def scrape(gateway) -> Scrape:
    # A gateway with keys takes the admin key (or --metrics-key) here; an open one ignores it.
    response = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def test_the_scrape_has_every_dashboard_series_and_vllm_lora_info(gateway):
    before = scrape(gateway)
    usage = {}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=gateway.url, headers=admin, timeout=120) as client:
        # Chat, for the trained answers: several tokens each, so vLLM sees the adapter running.
        response = client.post("/v1/chat/completions", json={"model": "pirate", "messages": WHO, "temperature": 0})
        assert response.status_code == 200, response.text
        usage["pirate"] = response.json()["usage"]
        assert usage["pirate"]["completion_tokens"] > 1
        for model, endpoint, body in [
            ("poet", "/v1/chat/completions", {"messages": WHO}),
            (gateway.base_name, "/v1/completions", {"prompt": "The ship"}),
        ]:
            body |= {
                "model": model,
                "max_tokens": 16,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with client.stream("POST", endpoint, json=body) as stream:
                assert stream.status_code == 200
                events = [line.removeprefix("data: ") for line in stream.iter_lines() if line]
            assert events[-1] == "[DONE]"
            usage[model] = json.loads(events[-2])["usage"]
    after = scrape(gateway)

    missing = sorted(name for name in dashboard_metric_names() if not after.declares(name))
    assert not missing, f"the dashboard queries series /metrics does not have: {missing}"
    without_samples = sorted(
        name for name in dashboard_metric_names() - NO_SAMPLE_YET if name not in after.sample_names
    )
    assert not without_samples, f"declared but never recorded: {without_samples}"

    # Our counters moved by exactly what the engine reported to the client.
    for model, endpoint in [("pirate", "chat"), ("poet", "chat"), (gateway.base_name, "completions")]:
        labels = {"adapter": model}
        assert (
            after.total("lora_gateway_requests_total", status="200", endpoint=endpoint, **labels)
            - before.total("lora_gateway_requests_total", status="200", endpoint=endpoint, **labels)
            == 1
        )
        for series, key in [
            ("lora_gateway_prompt_tokens_total", "prompt_tokens"),
            ("lora_gateway_generation_tokens_total", "completion_tokens"),
        ]:
            assert after.total(series, **labels) - before.total(series, **labels) == usage[model][key], (model, series)
    # vLLM records its stats in this (the API) process, not only in the engine core's.
    generated = sum(u["completion_tokens"] for u in usage.values())
    assert after.total("vllm:generation_tokens_total") - before.total("vllm:generation_tokens_total") == generated

    lora_info = [s for s in after.samples if s.name == "vllm:lora_requests_info"]
    assert lora_info, "vllm:lora_requests_info has no sample"
    # --max-loras 1, and no slot for a zero adapter: base requests carry none (server/engine/lora_ops.py).
    assert {s.labels["max_lora"] for s in lora_info} == {"1"}

    # The engine names adapter versions name@id; /metrics names them as the requests did, which
    # is what LoRA-aware endpoint pickers look the request's model up in (server/ops/metrics_lora_info.py).
    def listed(sample) -> set[str]:
        return {
            name
            for label in ("running_lora_adapters", "waiting_lora_adapters")
            for name in sample.labels[label].split(",")
            if name
        }

    assert set().union(*map(listed, lora_info)) <= {"pirate", "poet"}
    # The picker's reading: the newest series that lists an adapter. A one-token request is queued,
    # run and finished between two stats; pirate's and poet's answers are longer.
    busy = [s for s in lora_info if listed(s)]
    assert busy, "no vllm:lora_requests_info series lists an adapter"
    newest = max(busy, key=lambda s: s.value)
    assert listed(newest) <= {"pirate", "poet"} and newest.labels["running_lora_adapters"], newest.labels

"""vllm:lora_requests_info as /metrics serves it, read the way LoRA-aware endpoint pickers read it,
and the InferencePool example (deploy/k8s/inference-pool) that points such a picker at it.

Two readers: llm-d's router takes the series with the largest value; the Gateway API Inference
Extension's older picker skips series whose lists are both empty first. Both split each list on
"," and look the request's `model` up in it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.ops.metrics_lora_info import LORA_INFO, LoraInfoView, model_name, model_names
from tests.adapter_files import make_adapter
from tests.routes.test_tenancy import new_tenant, upload

# As vLLM declares it (vllm/v1/metrics/loggers.py, PrometheusStatLogger).
LABELS = ["max_lora", "waiting_lora_adapters", "running_lora_adapters"]
DOC = "Running stats on lora requests."


@dataclass(frozen=True)
class PickerView:
    running: set[str]
    waiting: set[str]
    max_lora: int


def split(value: str) -> set[str]:
    return set(value.split(",")) if value != "" else set()  # no trimming, as the pickers do


def picker_view(text: str, *, skip_empty: bool) -> PickerView | None:
    families = [f for f in text_string_to_metric_families(text) if f.name == LORA_INFO]
    samples = [s for f in families for s in f.samples]
    if skip_empty:
        samples = [s for s in samples if s.labels["running_lora_adapters"] or s.labels["waiting_lora_adapters"]]
    if not samples:
        return None
    newest = max(samples, key=lambda s: s.value)
    labels = newest.labels
    return PickerView(
        split(labels["running_lora_adapters"]), split(labels["waiting_lora_adapters"]), int(labels["max_lora"])
    )


def lora_gauge(registry: CollectorRegistry) -> Gauge:
    return Gauge(LORA_INFO, DOC, labelnames=LABELS, registry=registry)


def record(gauge: Gauge, running: str, waiting: str = "", when: float | None = None, max_lora: int = 4) -> None:
    child = gauge.labels(max_lora=max_lora, waiting_lora_adapters=waiting, running_lora_adapters=running)
    child.set_to_current_time() if when is None else child.set(when)


@pytest.mark.parametrize(
    ("engine_name", "model"),
    [("pirate@2", "pirate"), ("acme/support@17", "support"), ("base@1", None), ("weird", "weird"), ("a@b", "a@b")],
)
def test_engine_names_become_client_models(engine_name: str, model: str | None) -> None:
    assert model_name(engine_name, base_adapter_id=1) == model


def test_lists_are_deduplicated_and_joined_without_spaces() -> None:
    joined = "pirate@2,acme/support@7,base@1,pirate@9,other/support@8,poet@3"
    assert model_names(joined, base_adapter_id=1) == "pirate,support,poet"
    assert model_names("", base_adapter_id=1) == ""
    assert model_names("base@1", base_adapter_id=1) == ""


def test_the_picker_reads_client_models_from_the_newest_series() -> None:
    registry = CollectorRegistry()
    gauge = lora_gauge(registry)
    record(gauge, "pirate@2", when=100.0)
    record(gauge, "pirate@2,acme/support@7,base@1", waiting="poet@3", when=200.0)
    record(gauge, "", when=250.0)
    record(gauge, "base@1", when=300.0)  # base requests only: nothing a picker can use
    text = generate_latest(LoraInfoView(registry, base_adapter_id=1)).decode()

    assert "@" not in text
    # Unfiltered, the newest says the engine runs no adapter now; the older picker keeps the
    # newest that names adapters.
    assert picker_view(text, skip_empty=False) == PickerView(set(), set(), 4)
    assert picker_view(text, skip_empty=True) == PickerView({"pirate", "support"}, {"poet"}, 4)
    assert 'running_lora_adapters="pirate,support"' in text
    samples = [s for f in text_string_to_metric_families(text) if f.name == LORA_INFO for s in f.samples]
    assert sorted(s.value for s in samples) == [200.0, 300.0]  # the values vLLM set, kept


def test_a_busy_engine_leaves_one_series() -> None:
    registry = CollectorRegistry()
    gauge = lora_gauge(registry)
    for step, running in enumerate(["poet@3", "pirate@2,poet@3", "pirate@2"]):
        record(gauge, running, when=10.0 + step)
    record(gauge, "poet@3,pirate@2", max_lora=2)  # now, as vLLM sets it
    text = generate_latest(LoraInfoView(registry, base_adapter_id=1)).decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == LORA_INFO]
    assert len(family.samples) == 1
    for skip_empty in (False, True):
        assert picker_view(text, skip_empty=skip_empty) == PickerView({"poet", "pirate"}, set(), 2)


def test_every_other_family_is_served_unchanged() -> None:
    registry = CollectorRegistry()
    record(lora_gauge(registry), "pirate@2", when=1.0)
    Gauge("vllm:num_requests_waiting", "Requests waiting.", ["model_name"], registry=registry).labels("demo").set(3)
    plain = generate_latest(registry).decode().splitlines()
    viewed = generate_latest(LoraInfoView(registry, base_adapter_id=1)).decode().splitlines()
    assert [line for line in plain if LORA_INFO not in line] == [line for line in viewed if LORA_INFO not in line]
    assert 'vllm:num_requests_waiting{model_name="demo"} 3.0' in viewed


@pytest.fixture
def vllm_lora_info() -> Iterator[Gauge]:
    """vllm:lora_requests_info in the default registry, where vLLM records it in the gateway."""
    gauge = lora_gauge(REGISTRY)
    try:
        yield gauge
    finally:
        REGISTRY.unregister(gauge)


async def test_scrape_names_the_models_clients_sent(full, vllm_lora_info, tmp_path) -> None:
    # The base runs through the zero adapter here (full_gateway: --lora-ops vllm), a tenant and
    # the admin each have an adapter.
    key = await new_tenant(full, "acme")
    assert (await upload(full, key, "support", make_adapter(tmp_path / "support", seed=2))).status_code == 201
    shared = {"name": "shared-one", "path": str(make_adapter(tmp_path / "shared", seed=1))}
    assert (await full.client.post("/v1/adapters", json=shared, headers=full.admin)).status_code == 201
    sent = [(key, "support"), (key, "shared-one"), (key, "base")]
    for caller, model in sent:
        body = {"model": model, "prompt": "hi", "max_tokens": 2}
        response = await full.client.post("/v1/completions", json=body, headers=full.as_(caller))
        assert response.status_code == 200, response.text
    engine_names = [handle.name for *_, handle in full.engine.generated if handle is not None]
    assert len(engine_names) == 3 and all("@" in name for name in engine_names)
    # vLLM lists the LoRA names of the step's requests.
    record(vllm_lora_info, ",".join(engine_names[:2]), waiting=engine_names[2])

    response = await full.client.get("/metrics", headers=full.admin)
    assert response.status_code == 200
    text = response.text
    view = picker_view(text, skip_empty=False)
    assert view == picker_view(text, skip_empty=True)
    assert view == PickerView({"support", "shared-one"}, set(), 4)
    assert "acme/" not in text
    # Go's text parser, which the pickers use, refuses a family declared twice in one scrape.
    declared = Counter(line.split()[2] for line in text.splitlines() if line.startswith("# TYPE "))
    assert [name for name, count in declared.items() if count > 1] == []


def test_the_inference_pool_example_points_the_picker_at_the_gateway_pods() -> None:
    k8s = Path(__file__).resolve().parents[1] / "deploy" / "k8s"

    def documents(path: Path) -> dict[str, dict]:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}

    gateway = documents(k8s / "deployment.yaml")["Deployment"]["spec"]["template"]
    pool_dir = k8s / "inference-pool"
    listed = yaml.safe_load((pool_dir / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in pool_dir.glob("*.yaml") if p.name != "kustomization.yaml")
    assert "inference-pool" not in str(yaml.safe_load((k8s / "kustomization.yaml").read_text()))
    pool = documents(pool_dir / "inferencepool.yaml")["InferencePool"]
    picker = documents(pool_dir / "endpoint-picker.yaml")
    route = documents(pool_dir / "httproute.yaml")["HTTPRoute"]

    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= gateway["metadata"]["labels"].items()
    ports = {port["containerPort"] for port in gateway["spec"]["containers"][0]["ports"]}
    assert [port["number"] for port in pool["spec"]["targetPorts"]] == [8000] and 8000 in ports
    ref = pool["spec"]["endpointPickerRef"]
    service = picker["Service"]
    assert ref["name"] == service["metadata"]["name"]
    assert ref["port"]["number"] in {port["port"] for port in service["spec"]["ports"]}
    epp = picker["Deployment"]["spec"]["template"]
    assert service["spec"]["selector"].items() <= epp["metadata"]["labels"].items()
    args = epp["spec"]["containers"][0]["args"]
    assert f"--pool-name={pool['metadata']['name']}" in args
    assert epp["spec"]["serviceAccountName"] == picker["RoleBinding"]["subjects"][0]["name"]
    config = yaml.safe_load(picker["ConfigMap"]["data"]["epp-config.yaml"])
    plugins = {plugin.get("name", plugin["type"]): plugin for plugin in config["plugins"]}
    assert plugins["lora-affinity-scorer"]["type"] == "lora-affinity-scorer"
    source = config["dataLayer"]["sources"][0]
    assert plugins[source["pluginRef"]]["parameters"]["path"] == "/metrics"
    in_profile = {entry["pluginRef"] for entry in config["schedulingProfiles"][0]["plugins"]}
    assert in_profile <= plugins.keys() and "lora-affinity-scorer" in in_profile
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", pool["metadata"]["name"])

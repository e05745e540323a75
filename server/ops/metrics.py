"""The gateway's Prometheus metrics (`lora_gateway_*`), one set per app.

Each app gets its own CollectorRegistry, so tests can build many apps in one process. vLLM's
`vllm:*` series live in prometheus_client's default REGISTRY; `/metrics` serves both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.http.observe import RequestRecord

if TYPE_CHECKING:
    from adapters.registry import Registry

PREFIX = "lora_gateway_"
OTHER = "other"  # adapters past the label bound, and names never served
NO_MODEL = "none"  # the request named no model (e.g. its body did not parse)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AdapterLabels:
    """Bounds the `adapter` label: the first `limit` names get their own value, later ones 'other'.

    A name claims a value only when claimed explicitly (a request for it succeeded, or it was
    loaded), so 404s for made-up names cannot use up the bound. The base model always has its own.
    """

    def __init__(self, base_name: str, limit: int):
        self.base_name = base_name
        self.limit = limit
        self._named: set[str] = set()

    def label(self, name: str | None, *, claim: bool) -> str:
        if name is None:
            return NO_MODEL
        if name == self.base_name or name in self._named:
            return name
        if claim and len(self._named) < self.limit:
            self._named.add(name)
            return name
        return OTHER


class RegistryMetrics:
    """RegistryEvents that count adapter loads, load seconds, reloads and evictions."""

    def __init__(self, labels: AdapterLabels, registry: CollectorRegistry):
        self._labels = labels

        def per_adapter(name: str, text: str) -> Counter:
            return Counter(PREFIX + name, text, ["adapter"], registry=registry)

        self.loads = per_adapter(
            "adapter_loads",
            "Adapters loaded into the engine through add_lora (at registration, or first use after a restart)",
        )
        self.reloads = per_adapter(
            "adapter_reloads",
            "Requests sent for an adapter out of the engine's cache, which the engine reloads from the store",
        )
        self.evictions = per_adapter(
            "adapter_evictions", "Adapters that dropped out of the engine's LRU cache to make room for another"
        )
        self.load_seconds = Histogram(
            PREFIX + "adapter_load_seconds",
            "Time of an add_lora load of an adapter into the engine",
            buckets=LOAD_BUCKETS,
            registry=registry,
        )

    def _count(self, counter: Counter, name: str) -> None:
        counter.labels(self._labels.label(name, claim=True)).inc()

    def adapter_loaded(self, name: str, seconds: float) -> None:
        self._count(self.loads, name)
        self.load_seconds.observe(seconds)

    def adapter_reloaded(self, name: str) -> None:
        self._count(self.reloads, name)

    def adapter_evicted(self, name: str) -> None:
        self._count(self.evictions, name)


class GatewayMetrics:
    """Every `lora_gateway_*` series, in a CollectorRegistry of its own."""

    def __init__(self, base_name: str, adapter_labels: int):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = AdapterLabels(base_name, adapter_labels)
        self.events = RegistryMetrics(self.labels, self.registry)
        registry = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "Requests answered, by adapter, endpoint and HTTP status (probes and /metrics excluded)",
            ["adapter", "endpoint", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            PREFIX + "request_duration_seconds",
            "End-to-end latency of successful generation requests, to the last byte",
            ["adapter", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from arrival to the first generated token, streamed requests only",
            ["adapter", "endpoint"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot_seconds = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Time between generated tokens after the first, streamed requests only",
            ["adapter", "endpoint"],
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed, by adapter", ["adapter"], registry=registry
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated, by adapter", ["adapter"], registry=registry
        )
        self.in_flight = Gauge(
            PREFIX + "requests_in_flight", "Requests received and not yet answered in full", registry=registry
        )
        self.adapters_resident = Gauge(
            PREFIX + "adapters_resident",
            "Adapters in the engine's LRU cache as the registry tracks it (the base model's zero adapter not counted)",
            registry=registry,
        )
        self.adapters_registered = Gauge(
            PREFIX + "adapters_registered", "Adapters registered, resident or not", registry=registry
        )

        self.replica_requests = Counter(
            PREFIX + "replica_requests",
            "Generation requests answered, by the engine replica that ran them (with --ray) and adapter",
            ["replica", "adapter"],
            registry=registry,
        )
        self.backend_errors = Counter(
            PREFIX + "backend_errors",
            "Failed calls to the catalog's database or the adapter store, by backend",
            ["backend"],
            registry=registry,
        )
        for backend in ("catalog", "store"):
            self.backend_errors.labels(backend)
        self.fine_tuning_jobs = Counter(
            PREFIX + "fine_tuning_jobs",
            "Fine-tuning jobs this gateway ran to an end, by how they ended",
            ["status"],
            registry=registry,
        )
        for status in ("succeeded", "failed", "cancelled"):
            self.fine_tuning_jobs.labels(status)
        self.fine_tuning_running = Gauge(
            PREFIX + "fine_tuning_running", "Fine-tuning jobs running in this gateway now", registry=registry
        )
        self.fine_tuning_steps = Counter(
            PREFIX + "fine_tuning_steps", "Training steps of the fine-tuning jobs run here", registry=registry
        )
        # Labelled by tenant: tenants are bounded by the catalog; '(admin)' is the admin's and shared traffic.
        self.tenant_service_tokens = Counter(
            PREFIX + "tenant_service_tokens",
            "Service the engine gave each tenant, in the fair scheduler's weighted tokens (an input token "
            "counts 1, an output token 2), before the tenant's weight",
            ["tenant"],
            registry=registry,
        )
        self.tenant_queue_wait_seconds = Histogram(
            PREFIX + "tenant_queue_wait_seconds",
            "Time generation requests waited at the gateway for their turn in the engine, by tenant",
            ["tenant"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )

    def catalog_error(self) -> None:
        self.backend_errors.labels("catalog").inc()

    def store_error(self) -> None:
        self.backend_errors.labels("store").inc()

    def watch(self, registry: Registry) -> None:
        """Read the registry's counts at scrape time."""
        self.adapters_resident.set_function(lambda: registry.resident_count)
        self.adapters_registered.set_function(lambda: len(registry.entries()))

    def watch_fair_queue(self, queue: Any) -> None:
        """Count each tenant's service and waits as the fair queue (server/openai/fairness.py) hands out turns."""
        queue.on_served = lambda tenant, tokens: self.tenant_service_tokens.labels(tenant).inc(tokens)
        queue.on_waited = lambda tenant, seconds: self.tenant_queue_wait_seconds.labels(tenant).observe(seconds)

    def observe(
        self, record: RequestRecord, endpoint: str, status: int, seconds: float, *, generation: bool, streamed: bool
    ) -> None:
        """Count one answered request; `generation` marks completions and chat."""
        adapter = self.labels.label(record.model, claim=status < 400)
        self.requests.labels(adapter, endpoint, str(status)).inc()
        if not generation:
            return
        if record.replica is not None:
            self.replica_requests.labels(record.replica, adapter).inc()
        if record.prompt_tokens:
            self.prompt_tokens.labels(adapter).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.generation_tokens.labels(adapter).inc(record.completion_tokens)
        if status >= 400:
            return
        self.request_seconds.labels(adapter, endpoint).observe(seconds)
        # A non-streamed request's tokens arrive all at once: its first-token time is its latency.
        if streamed and record.first_token_at is not None and record.last_token_at is not None:
            self.ttft_seconds.labels(adapter, endpoint).observe(record.first_token_at - record.started_at)
            if record.completion_tokens > 1:
                per_token = (record.last_token_at - record.first_token_at) / (record.completion_tokens - 1)
                self.tpot_seconds.labels(adapter, endpoint).observe(per_token)

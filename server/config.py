"""Gateway settings: command-line flags, or LORA_GATEWAY_* environment variables."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "LORA_GATEWAY_"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Settings that take one of a few words, and those words.
CHOICES = {
    "log_format": ("json", "text"),
    "lora_ops": ("grouped", "vllm"),
    "json_whitespace": ("compact", "any"),
    "scheduling": ("fair", "fcfs"),
}
# The shortest admin or metrics key accepted: `lora-gateway new-key` prints 43 characters.
MIN_KEY_CHARS = 32


SLOT_MEMORY_CAP = 2 << 30  # the most the derived --max-loras slots take
HOST_TIER_CAP = 8 << 30  # the most the derived --adapter-cache-bytes holds


def memory_bytes() -> int:
    """The memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def default_cache_dir() -> Path:
    """This user's cache of the gateway's builds (the demo), as XDG says."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lora-gateway"


def _default_state_dir() -> Path:
    root = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(root) / "lora-gateway"


class Settings(BaseSettings):
    """Everything `lora-gateway serve` can be told. Field descriptions are the --help text."""

    # hide_input_in_errors: a refused key or catalog URL must not be echoed in an error message.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", hide_input_in_errors=True)

    model: str | None = Field(
        None, description="base model folder (Llama or Qwen2 family); none serves the embedded demo"
    )
    served_model_name: str | None = Field(
        None, description="name clients use for the base model (default: --model, or 'demo')"
    )
    lora_modules: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="adapters to serve at start, as NAME=PATH pairs"
    )
    # Both as in vLLM; with --lora-ops vllm the engine gets one more of each for the base model's zero adapter.
    # Unless given, the adapter tiers are sized from the base model and the memory (_size_adapter_tiers).
    max_loras: int | None = Field(
        None,
        ge=1,
        description="distinct adapters in one batch, besides base-model requests (default: --max-num-seqs, fewer "
        "if that many slots at --max-lora-rank would take more than 1/16 of the memory, at most 2 GiB)",
    )
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description="adapters resident in the engine at once, ready to enter a batch slot (default: twice "
        "--max-loras, at least 16)",
    )
    adapter_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="the engine's host tier: bytes of adapters kept parsed and checked in memory, least recently "
        "used dropped first, so that an adapter out of --max-cpu-loras comes back with a copy, not a file read; "
        "0 turns it off (default: 1/5 of the memory, at most 8 GiB)",
    )
    max_lora_rank: int = Field(64, description="largest adapter rank accepted")
    max_model_len: int | None = Field(
        None, ge=16, description="context length in tokens (default: the model's, capped at 4096)"
    )
    dtype: str = Field("auto", description="weights dtype: auto, float32, bfloat16 or float16")
    kv_cache_fraction: float = Field(
        0.2,
        gt=0,
        le=1,
        description="share of memory reserved for the KV cache (vLLM's --gpu-memory-utilization; "
        "on CPU a share of one NUMA node)",
    )
    max_num_seqs: int = Field(64, ge=1, description="sequences the engine batches at once")
    json_whitespace: str = Field(
        "compact",
        description="JSON that structured outputs constrain (response_format, TGI's grammar): compact, with no "
        "whitespace between tokens, or any, as vLLM allows by default (a small model may then emit spaces until "
        "max_tokens)",
    )
    engine_spin_us: int = Field(
        200,
        ge=0,
        le=1_000_000,
        description="how long the engine's processes spin (sched_yield) waiting for each other's next message",
    )
    engine_nap_us: int = Field(
        500,
        ge=0,
        le=100_000,
        description="after that spin, how long they sleep between looks; 0 spins as vLLM ships (costs a core)",
    )
    lora_ops: str = Field(
        "grouped",
        description="how the engine applies adapters on the CPU: grouped (by adapter, server/engine/lora_ops.py) "
        "or vllm (vLLM's per-token ops)",
    )
    host: str = Field(
        "127.0.0.1",
        description="address to listen on (0.0.0.0 for every interface); any address but loopback needs "
        "--admin-key (or --allow-open)",
    )
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    demo_dir: Path = Field(
        default_factory=lambda: default_cache_dir() / "demo",
        description="where the embedded demo is built once and reused",
    )
    state_dir: Path = Field(default_factory=_default_state_dir, description="where the gateway keeps its working files")
    catalog_url: SecretStr | None = Field(
        None,
        description="the catalog of adapters, tenants and keys: sqlite:///PATH or postgresql://user:pass@host:port/db "
        "(several gateways share one); without it, catalog.sqlite3 under --state-dir",
    )
    store_url: str | None = Field(
        None,
        description="where adapter files are kept: a folder, file:///shared/path (a volume several gateways share) "
        "or s3://bucket/prefix (endpoint and keys from the AWS environment); without it, adapters/ under --state-dir",
    )
    catalog_poll_seconds: float = Field(
        0.5,
        gt=0,
        le=60,
        description="how often to look for changes other gateways made to the catalog (PostgreSQL also notifies)",
    )
    store_sweep_seconds: float = Field(
        900.0,
        ge=0,
        description="how often to remove stored objects nothing references (replaced or deleted adapters, "
        "evicted merges, deleted files); 0 never",
    )
    store_grace_seconds: float = Field(
        900.0,
        ge=0,
        description="the store sweep keeps objects younger than this: another gateway may have just uploaded "
        "one and not yet written its row",
    )
    ray: bool = Field(
        False,
        description="serve through Ray Serve (the ray extra): one ingress with this API, and --replicas engine replicas",
    )
    replicas: int = Field(2, ge=1, le=1024, description="with --ray: engine replicas, each with the whole model")
    ray_address: str | None = Field(
        None,
        description="with --ray: join this Ray cluster (auto, or ray://host:10001); without it, a local Ray starts "
        "and stops with the gateway",
    )
    replica_cpus: float = Field(1.0, gt=0, description="with --ray: CPUs Ray reserves for each engine replica")
    min_replicas: int | None = Field(
        None, ge=0, description="with --ray: autoscale, never below this many replicas (with --max-replicas)"
    )
    max_replicas: int | None = Field(None, ge=1, description="with --ray: autoscale, never above this many replicas")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="with --ray and autoscaling: requests in flight per replica that Ray aims for"
    )
    ray_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="with --ray and a local Ray: the port of Ray's Prometheus export, which carries every "
        "replica's vLLM series with a ReplicaId label",
    )
    log_level: str = Field("info", description="debug, info, warning or error")
    log_format: str = Field("json", description="json (one object per line) or text")
    admin_key: SecretStr | None = Field(
        None,
        description=f"the admin's API key, {MIN_KEY_CHARS} characters or more (`lora-gateway new-key` prints one); "
        "without one the gateway runs open: every caller is the admin, so it serves on loopback only "
        "(elsewhere with --allow-open)",
    )
    allow_open: bool = Field(
        False,
        description="run open (no --admin-key) on an address other than loopback: whoever reaches it is the "
        "admin. Only for a network you trust entirely; a catalog with tenants or keys is never served open",
    )
    metrics_key: SecretStr | None = Field(
        None,
        description=f"a key ({MIN_KEY_CHARS} characters or more) that reads GET /metrics and nothing else, for "
        "Prometheus; with --admin-key, /metrics takes this key or the admin's",
    )
    adapter_dir: Path | None = Field(
        None, description="folder of adapter folders; an unknown model naming one registers it on first use"
    )
    export_dir: Path | None = Field(
        None,
        description="where POST /v1/adapters/NAME/export (admin) writes each adapter merged into the base model, "
        "as a standalone model folder; without it, exports are off",
    )
    max_training_jobs: int = Field(
        1,
        ge=0,
        le=64,
        description="fine-tuning jobs this gateway runs at once; 0 runs none here (another gateway of the "
        "catalog takes them)",
    )
    training_device: str = Field(
        "cpu", description="where fine-tuning runs: cpu, or a torch device such as cuda or cuda:1"
    )
    training_threads: int = Field(
        1, ge=1, le=256, description="CPU threads one fine-tuning job may use, so that serving keeps the rest"
    )
    training_cpus: float = Field(1.0, gt=0, description="with --ray: CPUs Ray reserves for each fine-tuning job")
    max_file_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest file accepted by POST /v1/files, in bytes"
    )
    tenant_max_file_bytes: int = Field(
        1024 * 1024 * 1024, ge=1024, description="default: bytes of files one tenant may keep"
    )
    tenant_max_queued_jobs: int = Field(
        4, ge=1, description="default: fine-tuning jobs one tenant may have waiting (validating or queued)"
    )
    tenant_max_queued_batches: int = Field(
        8, ge=1, description="default: batches one tenant may have not finished (validating, in progress, finalizing)"
    )
    tenant_max_batch_lines: int = Field(
        100_000, ge=1, description="default: lines one tenant's unfinished batches may hold together"
    )
    tenant_max_stored_responses: int = Field(
        10_000,
        ge=1,
        description="default: responses one tenant may keep stored (POST /v1/responses with store true, "
        "OpenAI's default); past it, storing another is refused (429) until some are deleted or expire",
    )
    response_retention_days: float = Field(
        30.0,
        gt=0,
        description="days a stored response (and its input items) is kept for GET /v1/responses/{id} and "
        "previous_response_id; then it is deleted",
    )
    batch_max_lines: int = Field(
        50_000,
        ge=1,
        description="most lines one batch input file (purpose=batch) may have; its bytes are capped "
        "by --max-file-bytes",
    )
    batch_max_running: int = Field(
        2,
        ge=0,
        le=64,
        description="batches this gateway runs at once; 0 runs none here (another gateway of the catalog takes them)",
    )
    batch_lines_in_flight: int = Field(
        2, ge=1, description="lines of all batches this gateway runs at once; each is one request on the engine"
    )
    batch_lines_per_batch: int = Field(2, ge=1, description="lines of one batch in flight at once")
    batch_yield_below: int = Field(
        1,
        ge=1,
        description="batch traffic yields to interactive traffic: a batch line starts only while fewer than this "
        "many interactive sequences are in flight on this gateway (1: only when none are)",
    )
    max_adapter_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="largest adapter accepted, in bytes (files together)"
    )
    tenant_max_concurrent: int = Field(
        16, ge=1, description="default: requests one tenant may have running, each sequence (prompts × n) counting once"
    )
    tenant_requests_per_second: float = Field(20.0, gt=0, description="default: requests per second per tenant")
    tenant_max_adapters: int = Field(100, ge=1, description="default: adapters one tenant may register")
    tenant_max_pinned: int = Field(
        1,
        ge=1,
        description="default: adapters one tenant may pin in the engine's cache; whatever the limits, tenants' "
        "pins together never take more than half of --max-cpu-loras",
    )
    tenant_max_merges: int = Field(
        4,
        ge=1,
        description="default: merged_adapters compositions kept for one tenant; a new one past it replaces the "
        "tenant's least recently used, whose files are deleted",
    )
    adapter_work_threads: int = Field(
        4,
        ge=1,
        le=64,
        description="threads for slow adapter work (conversions, validation, compositions, training-file "
        "checks), a pool apart from the one catalog and store calls use, so that one tenant's uploads never "
        "hold the threads another tenant's listing needs",
    )
    metrics_adapter_labels: int = Field(
        50, ge=0, description="adapters that get their own metrics label; the rest share 'other'"
    )
    max_in_flight: int = Field(
        256,
        ge=1,
        description="generation sequences in flight at once (a request counts once per sequence: prompts × n); "
        "beyond it new requests get 503 + Retry-After",
    )
    max_sequences_per_request: int = Field(
        64,
        ge=1,
        description="sequences one generation request may ask for (prompts × n); more is a 400 before any work. "
        "Each sequence also counts as one request against its tenant's concurrency and --max-in-flight",
    )
    scheduling: str = Field(
        "fair",
        description="how generation requests share the engine: fair (each tenant by the tokens it has been served, "
        "weighted; docs/fairness.md) or fcfs (in order of arrival, as vLLM alone does)",
    )
    fair_queue_depth: int | None = Field(
        None,
        ge=1,
        description="with --scheduling fair: sequences let into the engine at once, the rest wait at the gateway "
        "in fair order. Above the engine's batch, the few extra wait in the engine's own queue, in the same fair "
        "order, and fill a slot the moment it frees (default: 1.5 x --max-num-seqs, times --replicas or "
        "--max-replicas with --ray)",
    )
    admin_weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="with --scheduling fair: the share of the admin's and shared (keyless) traffic, as a "
        "tenant's weight (each tenant's is 1 unless the tenants API sets its 'weight' limit)",
    )
    max_training_seconds: float = Field(
        24 * 3600.0,
        gt=0,
        description="default: wall-clock seconds one fine-tuning job may train; past it the job fails and keeps "
        "its checkpoints (a tenant's 'max_training_seconds' limit overrides it)",
    )
    max_prompt_chars: int | None = Field(
        None,
        ge=1,
        description="longest prompt, in characters, read before tokenizing (a chat: its messages together); "
        "longer is a 400 (default: 32 per token of the context, 131072 for 4096 tokens)",
    )
    enable_auto_tool_choice: bool = Field(
        False,
        description='answer tool_choice "auto" (the default when a request has tools): the model decides whether '
        "to call, and --tool-call-parser reads its calls; as vLLM's flag",
    )
    tool_call_parser: str | None = Field(
        None,
        description="vLLM's parser for the model's tool-call syntax, for --enable-auto-tool-choice: hermes "
        "(Qwen2.5-style <tool_call>, the demo's), llama3_json, mistral, ...",
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest JSON request body, in bytes")
    drain_seconds: float = Field(30.0, ge=0, description="on SIGTERM, how long requests in flight may take to finish")

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _parse_lora_modules(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split()
        if isinstance(value, list | tuple):
            return dict(parse_lora_module(item) for item in value)
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_known(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            allowed = ", ".join(map(str, VLLM_LORA_RANKS))
            raise ValueError(f"--max-lora-rank must be one of {allowed}")
        return value

    @field_validator("training_device")
    @classmethod
    def _device_known(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?|mps|xpu(:[0-9]+)?", value):
            raise ValueError("--training-device must be cpu, cuda, cuda:N, mps or xpu[:N]")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, value: str) -> str:
        if value not in {"auto", "float32", "bfloat16", "float16", "half", "float"}:
            raise ValueError("--dtype must be auto, float32, bfloat16 or float16")
        return value

    @field_validator("admin_key", "metrics_key", "catalog_url", "store_url", "ray_address", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        # compose passes an unset variable as an empty string
        return None if value == "" else value

    @field_validator("admin_key", "metrics_key")
    @classmethod
    def _key_strong(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is None:
            return value
        flag = "--" + info.field_name.replace("_", "-")
        key = value.get_secret_value()
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(
                f"{flag} must have at least {MIN_KEY_CHARS} characters; `lora-gateway new-key` prints a random one"
            )
        if any(ch.isspace() for ch in key) or not key.isprintable():
            # A key read from a file often ends in a newline, which no client sends.
            raise ValueError(f"{flag} must not contain spaces, newlines or control characters")
        return value

    @field_validator(*CHOICES)
    @classmethod
    def _one_of_its_choices(cls, value: str, info: ValidationInfo) -> str:
        allowed = CHOICES[info.field_name]
        if value not in allowed:
            raise ValueError(f"--{info.field_name.replace('_', '-')} must be {' or '.join(allowed)}")
        return value

    @model_validator(mode="after")
    def _slots_consistent(self) -> Settings:
        self._size_adapter_tiers()
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("--max-cpu-loras must be at least --max-loras")
        autoscaling = (self.min_replicas, self.max_replicas, self.target_ongoing_requests)
        ray_only = (self.ray_address, self.ray_metrics_port, *autoscaling)
        if not self.ray and any(v is not None for v in ray_only):
            raise ValueError(
                "--ray-address, --ray-metrics-port, --min-replicas, --max-replicas and --target-ongoing-requests "
                "need --ray"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(
                "--enable-auto-tool-choice needs --tool-call-parser, the parser of the model's call syntax"
            )
        if self.ray and self.lora_ops != "grouped":
            raise ValueError("--ray needs --lora-ops grouped: base requests on a replica carry no adapter")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("--min-replicas and --max-replicas go together")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("--min-replicas must not exceed --max-replicas")
        return self

    def _size_adapter_tiers(self) -> None:
        """Fill in the tiers not given. Slots cost memory, not compute, with the grouped LoRA ops
        (server/engine/lora_ops.py): a slot per sequence, so that the scheduler never holds a
        request back because its adapter finds no slot, as far as 1/16 of the memory allows."""
        memory = memory_bytes()
        if self.max_loras is None:
            slot = self._slot_bytes()
            affordable = max(1, min(memory // 16, SLOT_MEMORY_CAP) // slot) if slot else self.max_num_seqs
            self.max_loras = min(self.max_num_seqs, affordable, self.max_cpu_loras or self.max_num_seqs)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(2 * self.max_loras, 16)
        if self.adapter_cache_bytes is None:
            self.adapter_cache_bytes = min(memory // 5, HOST_TIER_CAP)

    def _slot_bytes(self) -> int:
        """One engine slot's bytes for this base at --max-lora-rank; 0 when the base is not known yet."""
        from adapters.base_model import BaseModelInfo

        folder = self.base_model_dir()
        try:
            info = BaseModelInfo.from_model_dir(folder) if folder is not None else None
        except (OSError, KeyError, ValueError):
            info = None
        if info is None:
            return 0
        return info.slot_bytes(self.max_lora_rank, 2 if self.dtype in ("bfloat16", "float16") else 4)

    def base_model_dir(self) -> Path | None:
        """The base model's folder: --model, or the demo's once built; None when it is not known."""
        if self.model is not None:
            return Path(self.model)
        from adapters.demo import IncompleteDemo, load_demo

        try:
            return load_demo(self.demo_dir).base
        except IncompleteDemo:
            return None

    @property
    def base_uses_zero_adapter(self) -> bool:
        """vLLM's own LoRA ops read "no adapter" as the last slot's adapter (the bleed); a base
        request then runs through an all-zero adapter instead. The grouped ops give it none."""
        return self.lora_ops == "vllm"

    @property
    def engine_sequences(self) -> int:
        """Sequences every engine replica together batches at once (the fair queue's default depth is half as much again)."""
        if not self.ray:
            return self.max_num_seqs
        return self.max_num_seqs * (self.max_replicas or self.replicas)

    @property
    def fair_depth(self) -> int:
        """The fair queue's depth: --fair-queue-depth, or the engine's batch and half as many again, so that the
        engine's queue holds the next requests (in fair order) when a sequence ends."""
        return self.fair_queue_depth or self.engine_sequences + self.engine_sequences // 2

    @property
    def catalog_location(self) -> str:
        """The catalog's URL, with its password: pass it to the database only, never log it."""
        if self.catalog_url is not None:
            return self.catalog_url.get_secret_value()
        return f"sqlite:///{self.state_dir / 'catalog.sqlite3'}"

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.model or "demo"


def parse_lora_module(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules expects NAME=PATH, got '{item}'")
    return name, path

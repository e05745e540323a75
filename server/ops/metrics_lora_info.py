"""vLLM's `vllm:lora_requests_info`, rewritten at scrape time for LoRA-aware endpoint pickers.

The Gateway API Inference Extension's endpoint picker and llm-d's router score a pod for a request
by looking up the request's `model` in that series' `running_lora_adapters` and
`waiting_lora_adapters` labels. vLLM fills them with the engine's LoRA names, which the gateway
makes `name@id` (one per adapter version; `tenant/name@id` for a tenant's adapter), so no request's
`model` ever matched. `LoraInfoView` serves another registry's families unchanged, except this one:

- each engine name becomes the `model` a client sends: `pirate@2` -> `pirate`. A tenant calls its
  own adapter by its plain name, so `acme/support@7` -> `support`: two tenants' adapters of one name
  then show as one, a routing hint that at worst costs a load, and tenants' names stay out of
  the series, which every holder of the admin key or --metrics-key reads (a picker holds the
  latter);
- the base model's zero adapter (`--lora-ops vllm`) is left out: base requests need no adapter;
- names are deduplicated and joined with "," and no spaces (pickers split on "," without trimming);
- the value (the time vLLM last set the series) and `max_lora` are kept;
- of the series vLLM keeps (one per label combination it ever saw, never removed) only the newest
  stays, and, when its lists are empty (an idle engine), the newest that names an adapter too.
  llm-d's router reads the newest series; the inference extension's older picker skips empty
  ones and reads the newest of the rest: both read from this view what they would read from
  vLLM's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

LORA_INFO = "vllm:lora_requests_info"
RUNNING = "running_lora_adapters"
WAITING = "waiting_lora_adapters"
_ENGINE_NAME = re.compile(r"(?P<qualified>.+)@(?P<adapter_id>\d+)")


class Collectable(Protocol):
    def collect(self) -> Iterator[Metric]: ...


def model_name(engine_name: str, base_adapter_id: int) -> str | None:
    """The `model` a client sends for an engine-side LoRA name; None for the zero adapter."""
    if (match := _ENGINE_NAME.fullmatch(engine_name)) is None:
        return engine_name  # not one of the gateway's names: leave it as the engine has it
    if int(match["adapter_id"]) == base_adapter_id:
        return None
    return match["qualified"].rpartition("/")[2]


def model_names(joined: str, base_adapter_id: int) -> str:
    """A comma-separated list of engine names as client model names, once each, in order."""
    names: dict[str, None] = {}
    for engine_name in joined.split(","):
        if (name := model_name(engine_name.strip(), base_adapter_id)) is not None and name:
            names.setdefault(name)
    return ",".join(names)


def rewrite_lora_info(family: Metric, base_adapter_id: int) -> Metric:
    """The family with client model names, reduced to what a picker reads (see the module doc)."""
    samples = [
        sample._replace(
            labels=sample.labels
            | {label: model_names(sample.labels.get(label, ""), base_adapter_id) for label in (RUNNING, WAITING)}
        )
        for sample in family.samples
    ]
    rewritten = Metric(family.name, family.documentation, family.type, family.unit)
    if not samples:
        return rewritten
    newest = max(samples, key=lambda sample: sample.value)
    kept: list[Sample] = [newest]
    if not (newest.labels[RUNNING] or newest.labels[WAITING]):
        named = [sample for sample in samples if sample.labels[RUNNING] or sample.labels[WAITING]]
        if named:
            kept.insert(0, max(named, key=lambda sample: sample.value))
    rewritten.samples = kept
    return rewritten


class LoraInfoView:
    """Another registry's families as they are, with `vllm:lora_requests_info` rewritten."""

    def __init__(self, source: Collectable, base_adapter_id: int):
        self.source = source
        self.base_adapter_id = base_adapter_id

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            yield rewrite_lora_info(family, self.base_adapter_id) if family.name == LORA_INFO else family

"""The adapter tiers' derived sizes (server/config.py) and the engine's host tier
(server/engine/host_tier.py), at unit level."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.base_model import BaseModelInfo
from server.config import HOST_TIER_CAP, SLOT_MEMORY_CAP, Settings, memory_bytes
from server.engine.host_tier import HostTier, lora_bytes, make_load_adapter, make_remove_adapter
from server.engine.plugins import plugin_env

# A Qwen2 of the benchmark's shape (bench/many_adapters.py): hidden 896, 12 layers.
QWEN_180M = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 12,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 1008,
}


@pytest.fixture
def big_base(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN_180M))
    return folder


def test_slot_bytes_count_every_adaptable_layer_at_the_largest_rank():
    info = BaseModelInfo.from_config(QWEN_180M)
    # q, k, v, o, gate, up, down: (in + out) per layer; then the lm_head's hidden + vocabulary.
    per_layer = (896 + 896) + 2 * (896 + 128) + (896 + 896) + 2 * (896 + 4864) + (4864 + 896)
    assert info.slot_bytes(16, 4) == 16 * 4 * (12 * per_layer + 896 + 1008)
    assert info.slot_bytes(64, 2) == info.slot_bytes(16, 4) * 2


def test_derived_slots_are_one_per_sequence_when_memory_allows(big_base: Path):
    settings = Settings(model=str(big_base), max_lora_rank=8, max_num_seqs=16)
    assert settings.max_loras == 16  # 16 slots of ~9 MB: far below 1/16 of any test machine's memory
    assert settings.max_cpu_loras == 32
    assert settings.adapter_cache_bytes == min(memory_bytes() // 5, HOST_TIER_CAP)


def test_derived_slots_are_bounded_by_memory(big_base: Path):
    settings = Settings(model=str(big_base), max_lora_rank=512, max_num_seqs=1024)
    slot = BaseModelInfo.from_model_dir(big_base).slot_bytes(512, 4)
    expected = max(1, min(memory_bytes() // 16, SLOT_MEMORY_CAP) // slot)
    assert settings.max_loras == expected < 1024
    assert settings.max_loras * slot <= SLOT_MEMORY_CAP
    assert settings.max_cpu_loras == max(2 * expected, 16)


def test_given_values_are_kept_and_derived_ones_fit_them(big_base: Path):
    given = Settings(model=str(big_base), max_loras=4, max_cpu_loras=16, adapter_cache_bytes=0)
    assert (given.max_loras, given.max_cpu_loras, given.adapter_cache_bytes) == (4, 16, 0)
    assert plugin_env(given)["LORA_GATEWAY_ADAPTER_CACHE_BYTES"] == "0"
    # Only the engine's cache given: the slots never exceed it.
    assert Settings(model=str(big_base), max_cpu_loras=3).max_loras == 3
    # Only the slots given: the engine's cache is twice as many, at least 16.
    assert Settings(model=str(big_base), max_loras=20).max_cpu_loras == 40
    with pytest.raises(ValueError, match="--max-cpu-loras must be at least --max-loras"):
        Settings(model=str(big_base), max_loras=8, max_cpu_loras=4)


def test_the_demo_unbuilt_gets_a_slot_per_sequence(tmp_path: Path):
    settings = Settings(demo_dir=tmp_path / "nothing-here", max_num_seqs=32)
    assert settings.max_loras == 32


class FakeLoRA:
    """vLLM's LoRAModel, as far as the tier uses it: modules of tensors, and clone."""

    def __init__(self, key: int, floats: int):
        self.id = key
        self.loras = {"m": type("W", (), {"lora_a": torch.zeros(floats // 2), "lora_b": torch.zeros(floats // 2)})()}
        self.modules_to_save: dict = {}

    def clone(self, key: int) -> FakeLoRA:
        copy = FakeLoRA.__new__(FakeLoRA)
        copy.id, copy.loras, copy.modules_to_save = key, dict(self.loras), {}
        return copy


def test_host_tier_keeps_its_byte_budget_least_recently_used_first():
    tier = HostTier(budget=1000)
    for key in (1, 2, 3):
        tier.put(key, f"adapter {key}", 300)
    assert tier.bytes == 900 and len(tier) == 3
    assert tier.get(1) == "adapter 1"  # now the newest: 2 is the oldest
    tier.put(4, "adapter 4", 300)  # 1200 > 1000: 2 goes
    assert [key for key in (1, 2, 3, 4) if key in tier] == [1, 3, 4]
    assert tier.bytes == 900
    tier.put(5, "too big", 1001)  # larger than the whole budget: not kept, nothing dropped for it
    assert 5 not in tier and len(tier) == 3
    tier.put(3, "adapter 3 again", 500)  # a key put again replaces its bytes: 1100, so 1 goes
    assert [key for key in (1, 3, 4) if key in tier] == [3, 4] and tier.bytes == 800
    assert tier.get(3) == "adapter 3 again"
    tier.drop(3)
    tier.drop(99)
    assert [key for key in (1, 3, 4) if key in tier] == [4] and tier.bytes == 300
    assert (tier.hits, tier.misses) == (2, 0)
    assert tier.get(2) is None and tier.misses == 1


def test_a_load_that_hits_costs_no_read_and_gives_a_copy():
    reads: list[int] = []

    def read_files(manager: object, request: object) -> FakeLoRA:
        reads.append(request.lora_int_id)
        return FakeLoRA(request.lora_int_id, 1000)

    tier = HostTier(budget=10_000)  # two adapters of 4,000 bytes
    load = make_load_adapter(read_files, tier)
    remove = make_remove_adapter(lambda manager, key: True, tier)
    request = type("Request", (), {})

    def ask(key: int) -> FakeLoRA:
        one = request()
        one.lora_int_id = key
        return load(None, one)

    first = ask(1)
    assert lora_bytes(first) == 4000 and tier.bytes == 4000
    again = ask(1)
    assert reads == [1]  # the second load came from the tier
    assert again is not first and again.loras is not first.loras and again.loras["m"] is first.loras["m"]
    again.loras.pop("m")  # vLLM packs the copy's modules in place: the tier's stay whole
    assert "m" in ask(1).loras
    ask(2)
    ask(3)  # 12,000 bytes: 1, the least recently used, goes
    ask(1)
    assert reads == [1, 2, 3, 1]
    remove(None, 1)  # removed from the engine: out of the tier too
    assert 1 not in tier


def test_the_benchmark_reads_the_tiers_the_engine_logs(tmp_path: Path, caplog):
    from bench.many_adapters import tiers
    from server.engine import host_tier

    tier = HostTier(budget=10)
    tier.put(1, "adapter", 4)
    tier.get(1)
    with caplog.at_level("INFO", logger=host_tier.logger.name):
        tier.report(1e9)
    log = tmp_path / "gateway.log"
    started = "adapter tiers: max_loras=22 batch slots, max_cpu_loras=44 ready in the engine, adapter_cache_bytes=99 "
    log.write_text(started + "in the host tier\n" + caplog.text)
    assert tiers(log) == {
        "max_loras": 22,
        "max_cpu_loras": 44,
        "adapter_cache_bytes": 99,
        "host_tier": {"adapters": 1, "bytes": 4, "hits": 1, "misses": 0},
    }

"""server.engine.lora_ops: the vLLM plugin that applies LoRA per adapter group instead of per token."""

from __future__ import annotations

import random
from importlib.metadata import entry_points

import pytest
import torch

from server.engine import lora_ops as engine_lora
from server.engine import lora_rows
from server.engine.plugins import plugin_env

pytestmark = pytest.mark.imports("vllm")  # in this process: see tests/conftest.py

MAX_LORAS, RANK = 4, 8


@pytest.fixture(scope="module", autouse=True)
def vllm_lora_classes() -> None:
    """vLLM's LoRA classes and ops, imported by the worker that runs this file: at module level,
    their 3.5 s import was paid by every xdist worker while collecting. (A module-scoped fixture
    also keeps the file's tests on one worker: tests/conftest.py.)"""
    global BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA, LoRAMapping, LoRAModelManager
    global bgmv_expand, bgmv_shrink, PunicaWrapperBase, PunicaWrapperCPU
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.ops.torch_ops import bgmv_expand, bgmv_shrink
    from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU


# (input size, output slices) of the demo model's layers: qkv, o, gate_up, down
LAYERS = ((256, (256, 128, 128)), (256, (256,)), (256, (512, 512)), (512, (256,)))


def wrapper(slot_ids: list[int | None], token_ids: list[int], sampled_ids: list[int] | None = None) -> PunicaWrapperCPU:
    """vLLM's CPU wrapper after a step's mapping: adapter ids per token and sampled row, 0 for none."""
    punica = PunicaWrapperCPU(4096, 64, "cpu")
    mapping = LoRAMapping(token_ids, tuple(sampled_ids or token_ids), is_prefill=True)
    punica.update_metadata(mapping, slot_ids, MAX_LORAS, 733)
    return punica


def step_tokens(seed: int, adapter_ids: list[int]) -> list[int]:
    """A mixed step: decodes (one token) and prefills (many), each of a random adapter or none."""
    rng = random.Random(seed)
    tokens: list[int] = []
    for _ in range(24):
        tokens += [rng.choice([*adapter_ids, 0])] * (1 if rng.random() < 0.5 else rng.randint(5, 40))
    return tokens


def weights(in_size: int, slices: tuple[int, ...], free_slots: tuple[int, ...] = ()) -> tuple:
    lora_a = tuple(torch.randn(MAX_LORAS, 1, RANK, in_size) * 0.1 for _ in slices)
    lora_b = tuple(torch.randn(MAX_LORAS, 1, size, RANK) * 0.1 for size in slices)
    for tensor in lora_a + lora_b:
        for slot in free_slots:
            tensor[slot] = 0  # as vLLM leaves a slot no adapter holds
    return lora_a, lora_b


def vllm_add_lora_linear(punica, y, x, lora_a, lora_b, scale, slices):
    """vLLM's own PunicaWrapperCPU.add_lora_linear, from its unpatched parts: the per-token ops.

    (The real-engine tests start engines in this process, which patch the class itself.)
    """
    buffer = tuple(torch.zeros(x.size(0), RANK) for _ in slices)
    punica.add_shrink(buffer, x, lora_a, scale)
    punica.add_expand(y, buffer, lora_b, slices, add_inputs=True)


def vllm_add_lora_logits(punica, y, x, lora_a, lora_b, scale):
    """vLLM's own PunicaWrapperCPU.add_lora_logits."""
    buffer = torch.zeros(x.size(0), RANK)
    bgmv_shrink(x, lora_a, buffer, punica.sampler_indices, scale)
    bgmv_expand(buffer, lora_b, y, punica.sampler_indices, add_inputs=True)


def grouped(punica: PunicaWrapperCPU) -> PunicaWrapperCPU:
    punica._gateway_groups = engine_lora.token_groups(punica.token_lora_indices)
    punica._gateway_sampler_groups = engine_lora.token_groups(punica.sampler_indices)
    return punica


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_sums_as_vllms_ops_where_those_are_right(seed):
    # With the last slot free, vLLM's ops give tokens without an adapter nothing, as they should.
    torch.manual_seed(seed)
    slot_ids = [7, 8, 9, None]
    tokens = step_tokens(seed, [7, 8, 9])
    stock, ours = wrapper(slot_ids, tokens), grouped(wrapper(slot_ids, tokens))
    for in_size, slices in LAYERS:
        lora_a, lora_b = weights(in_size, slices, free_slots=(3,))
        x = torch.randn(len(tokens), in_size)
        y = torch.randn(len(tokens), sum(slices))
        expected, got = y.clone(), y.clone()
        vllm_add_lora_linear(stock, expected, x, lora_a, lora_b, 0.5, slices)
        engine_lora.add_lora_linear(ours, got, x, lora_a, lora_b, 0.5, slices)
        assert not torch.equal(expected, y)  # adapters did change the output
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slot_ids", [[7, 8, 9, None], [7, 8, 9, 6]])
def test_the_lm_heads_lora_per_sampled_row(slot_ids):
    torch.manual_seed(4)
    sampled = [random.Random(4).choice([7, 8, 9, 0]) for _ in range(20)] + [0, 7]
    punica = grouped(wrapper(slot_ids, sampled, sampled))
    lora_a = torch.randn(MAX_LORAS, 1, RANK, 256) * 0.1
    lora_b = torch.randn(MAX_LORAS, 1, 736, RANK) * 0.1  # vocabulary rows padded past the logits' 733
    if slot_ids[-1] is None:
        lora_a[3] = lora_b[3] = 0
    x, y = torch.randn(len(sampled), 256), torch.randn(len(sampled), 733)
    expected, got = y.clone(), y.clone()
    vllm_add_lora_logits(punica, expected, x, lora_a, lora_b, 1.0)
    engine_lora.add_lora_logits(punica, got, x, lora_a, lora_b, 1.0)
    no_adapter = torch.tensor(sampled) == 0
    torch.testing.assert_close(got[~no_adapter], expected[~no_adapter], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[no_adapter], y[no_adapter])
    # vLLM's agrees on rows without an adapter only while the last slot is free.
    assert torch.allclose(expected[no_adapter], y[no_adapter]) == (slot_ids[-1] is None)


def test_products_use_each_slots_own_rank_and_skip_layers_it_leaves_alone():
    # Slots at RANK; the adapters in them have ranks 3 and 8, and one leaves the layer alone.
    torch.manual_seed(5)
    slot_ids = [7, 8, 9, None]
    tokens = step_tokens(5, [7, 8, 9])
    in_size, slices = LAYERS[0]
    lora_a, lora_b = weights(in_size, slices, free_slots=(2, 3))
    for tensor in lora_a:
        tensor[0, :, 3:] = 0  # slot 0 holds a rank-3 adapter: rows past its rank are zero
    for tensor in lora_b:
        tensor[0, :, :, 3:] = 0
    module = type("Layer", (), {"lora_a_stacked": lora_a})()
    x, y = torch.randn(len(tokens), in_size), torch.randn(len(tokens), sum(slices))
    full, ranked = y.clone(), y.clone()
    engine_lora.add_lora_linear(grouped(wrapper(slot_ids, tokens)), full, x, lora_a, lora_b, 0.5, slices)
    slot_weights = type("Weights", (), {})
    for slot, rank in ((0, 3), (1, RANK)):
        one = slot_weights()
        one.lora_a = [torch.zeros(rank, in_size) for _ in slices]
        engine_lora.record_slot_ranks(module, slot, one)
    engine_lora.record_slot_ranks(module, 2, None)  # reset: slot 2's adapter does not target this layer
    assert [engine_lora.slot_rank(lora_a[0], slot) for slot in range(4)] == [3, RANK, 0, None]
    engine_lora.add_lora_linear(grouped(wrapper(slot_ids, tokens)), ranked, x, lora_a, lora_b, 0.5, slices)
    assert not torch.equal(full, y)
    torch.testing.assert_close(ranked, full, rtol=1e-5, atol=1e-5)


def test_products_follow_what_vllm_copies_into_a_slot():
    """The slots' views are kept between steps: a new adapter copied into a slot, of another rank,
    must be what the next step multiplies by."""
    torch.manual_seed(6)
    slot_ids = [7, 8, None, None]
    tokens = step_tokens(6, [7, 8])
    in_size, slices = LAYERS[0]
    lora_a, lora_b = weights(in_size, slices, free_slots=(2, 3))
    layer = type("Layer", (), {"lora_a_stacked": lora_a, "lora_b_stacked": lora_b})()
    x, y = torch.randn(len(tokens), in_size), torch.randn(len(tokens), sum(slices))
    for rank in (RANK, 5):  # slot 0 gets an adapter of rank 5 in place of its rank-8 one
        if rank != RANK:
            for a, b in zip(lora_a, lora_b, strict=True):
                a[0].copy_(torch.randn_like(a[0]) * 0.1)
                b[0].copy_(torch.randn_like(b[0]) * 0.1)
                a[0, :, rank:] = 0
                b[0, :, :, rank:] = 0
        one = type("Weights", (), {"lora_a": [torch.zeros(rank, in_size) for _ in slices]})()
        engine_lora.record_slot_ranks(layer, 0, one)
        expected, got = y.clone(), y.clone()
        vllm_add_lora_linear(wrapper(slot_ids, tokens), expected, x, lora_a, lora_b, 0.5, slices)
        engine_lora.add_lora_linear(grouped(wrapper(slot_ids, tokens)), got, x, lora_a, lora_b, 0.5, slices)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens",
    [[7, 7, 8, 8, *[9] * 20, 0], [7, 8, 0, *[9] * 20, 8, 0, 7, 0]],
    ids=["decodes-first", "decodes-scattered"],
)
def test_small_groups_gathered_from_float32_copies_give_the_same_sums(dtype, tokens):
    """Decode rows (groups under lora_rows.SMALL_GROUP) are multiplied together from float32 copies
    of their slots, prompts group by group; both agree with vLLM's ops, and a slot reset without a
    new copy falls back to its own products."""
    torch.manual_seed(7)
    slot_ids = [7, 8, 9, None]
    in_size, slices = LAYERS[0]
    lora_a, lora_b = weights(in_size, slices, free_slots=(3,))
    for a, b in zip(lora_a, lora_b, strict=True):
        a[1, :, 5:] = 0  # slot 1 holds a rank-5 adapter
        b[1, :, :, 5:] = 0
    lora_a, lora_b = tuple(t.to(dtype) for t in lora_a), tuple(t.to(dtype) for t in lora_b)
    layer = type("Layer", (), {"lora_a_stacked": lora_a, "lora_b_stacked": lora_b})()
    for slot, rank in ((0, RANK), (1, 5), (2, RANK)):
        one = type("Weights", (), {"lora_a": [torch.zeros(rank, in_size) for _ in slices]})()
        engine_lora.record_slot_ranks(layer, slot, one)
    punica = wrapper(slot_ids, tokens)
    step = lora_rows.plan(engine_lora.token_groups(punica.token_lora_indices))
    assert [slot for slot, _ in step.small] == [0, 1] and [slot for slot, _ in step.large] == [2]  # both paths run
    assert lora_rows.step_rank(lora_rows.copies(lora_a[0], lora_b[0]), step) == RANK
    x, y = torch.randn(len(tokens), in_size), torch.randn(len(tokens), sum(slices))
    expected = y.clone()
    wide_a, wide_b = tuple(t.float().clone() for t in lora_a), tuple(t.float().clone() for t in lora_b)
    vllm_add_lora_linear(wrapper(slot_ids, tokens), expected, x.to(dtype).float(), wide_a, wide_b, 0.5, slices)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for reset in (False, True):
        if reset:  # vLLM resets slot 1 and copies an adapter in some way this plugin does not see
            engine_lora.make_reset_lora(None)(layer, 1)
            for a, b, wa, wb in zip(lora_a, lora_b, wide_a, wide_b, strict=True):
                a[1], b[1] = wa[1].to(dtype), wb[1].to(dtype)
            assert lora_rows.step_rank(lora_rows.copies(lora_a[0], lora_b[0]), step) is None
        got = y.to(dtype, copy=True)
        engine_lora.add_lora_linear(grouped(punica), got, x.to(dtype), lora_a, lora_b, 0.5, slices)
        torch.testing.assert_close(got.float(), expected.to(dtype).float(), **tolerance)


def test_a_reset_zeroes_what_the_slots_last_adapter_filled():
    whole = []
    reset = engine_lora.make_reset_lora(lambda layer, index: whole.append(index))
    lora_a, lora_b = weights(256, (256, 128), free_slots=())
    for tensor in lora_a:
        tensor[1, :, 3:] = 0  # slot 1 holds a rank-3 adapter
    for tensor in lora_b:
        tensor[1, :, :, 3:] = 0
    layer = type("Layer", (), {"lora_a_stacked": lora_a, "lora_b_stacked": lora_b})()
    one = type("Weights", (), {"lora_a": [torch.zeros(3, 256), torch.zeros(3, 256)]})()
    engine_lora.record_slot_ranks(layer, 1, one)
    assert engine_lora.slot_rank(lora_a[0], 0) is None  # never recorded: zeroed whole
    for slot in (0, 1):
        reset(layer, slot)
        for a, b in zip(lora_a, lora_b, strict=True):
            assert not a[slot].any() and not b[slot].any()
            assert engine_lora.slot_rank(a, slot) is None  # until activate_adapter records the next copy
    assert lora_a[0][2].any() and lora_b[1][3].any()  # the other slots keep their adapters
    assert whole == []  # vLLM's own reset (the whole slot) was not needed
    assert engine_lora.make_reset_lora(lambda layer, index: whole.append(index))(object(), 0) is None
    assert whole == [0]  # a layer of another layout: vLLM's own


def test_tokens_without_an_adapter_stay_untouched_when_every_slot_is_taken():
    torch.manual_seed(3)
    slot_ids = [5, 6, 7, 8]
    tokens = step_tokens(3, [5, 6, 7, 8])
    no_adapter = torch.tensor(tokens) == 0
    in_size, slices = LAYERS[0]
    lora_a, lora_b = weights(in_size, slices)
    x, y = torch.randn(len(tokens), in_size), torch.randn(len(tokens), sum(slices))
    stock, got = y.clone(), y.clone()
    vllm_add_lora_linear(wrapper(slot_ids, tokens), stock, x, lora_a, lora_b, 1.0, slices)
    engine_lora.add_lora_linear(grouped(wrapper(slot_ids, tokens)), got, x, lora_a, lora_b, 1.0, slices)
    assert torch.equal(got[no_adapter], y[no_adapter])
    assert not torch.equal(got[~no_adapter], y[~no_adapter])
    # vLLM's own ops read slot -1 as the last slot: the bleed this plugin ends.
    assert not torch.allclose(stock[no_adapter], y[no_adapter])


def test_a_step_without_adapters_costs_nothing():
    tokens = [0] * 30
    punica = grouped(wrapper([1, None, None, None], tokens))
    assert punica._gateway_groups == []
    in_size, slices = LAYERS[1]
    lora_a, lora_b = weights(in_size, slices)
    y = torch.randn(len(tokens), sum(slices))
    before = y.clone()
    engine_lora.add_lora_linear(punica, y, torch.randn(len(tokens), in_size), lora_a, lora_b, 1.0, slices)
    assert torch.equal(y, before)


def test_groups_are_slices_when_contiguous():
    groups = engine_lora.token_groups(torch.tensor([2, 2, 2, -1, 0, 1, 0]))
    assert [slot for slot, _ in groups] == [0, 1, 2]
    assert groups[2][1] == slice(0, 3) and groups[1][1] == slice(5, 6)
    assert groups[0][1].tolist() == [4, 6]


def test_registers_only_when_asked_and_once(monkeypatch):
    def shipped(*args, **kwargs):
        raise AssertionError("vLLM's ops ran")

    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", shipped)
    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_logits", shipped)
    monkeypatch.setattr(PunicaWrapperCPU, "update_metadata", PunicaWrapperBase.update_metadata)
    monkeypatch.setattr(PunicaWrapperCPU, "_gateway_grouped", False, raising=False)
    monkeypatch.setattr(LoRAModelManager, "activate_adapter", LoRAModelManager.activate_adapter)
    monkeypatch.setattr(LoRAModelManager, "_gateway_slot_ranks", False, raising=False)
    for layer in (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA):
        monkeypatch.setattr(layer, "reset_lora", layer.reset_lora)
    monkeypatch.delenv(engine_lora.ENV, raising=False)
    engine_lora.register()
    assert PunicaWrapperCPU.add_lora_linear is shipped
    monkeypatch.setenv(engine_lora.ENV, "1")
    engine_lora.register()
    update = PunicaWrapperCPU.update_metadata
    engine_lora.register()
    assert PunicaWrapperCPU.add_lora_linear is engine_lora.add_lora_linear
    assert PunicaWrapperCPU.add_lora_logits is engine_lora.add_lora_logits
    assert PunicaWrapperCPU.update_metadata is update  # not wrapped twice
    # After a mapping, the groups follow it.
    punica = wrapper([4, None, None, None], [4, 4, 0])
    assert list(punica._gateway_groups) == [(0, slice(0, 2))]
    assert list(punica._gateway_sampler_groups) == [(0, slice(0, 2))]


def test_the_entry_point_is_installed():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("lora_gateway_engine_lora") == "server.engine.lora_ops:register"


def test_the_setting_reaches_the_engines_environment():
    from pydantic import ValidationError

    from server.config import Settings

    assert plugin_env(Settings())[engine_lora.ENV] == "1"
    assert plugin_env(Settings(lora_ops="vllm"))[engine_lora.ENV] == "0"
    with pytest.raises(ValidationError, match="--lora-ops must be grouped or vllm"):
        Settings(lora_ops="fast")


def test_the_microbenchmark_agrees_and_times_both(capsys):
    from bench import lora_ops

    lora_ops.main(["--sequences", "6", "--repeats", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["qkv", "o", "gate_up", "down"]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0 and float(row[4]) < 1e-4

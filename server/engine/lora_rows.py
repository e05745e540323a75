"""LoRA products of a step's small adapter groups, in one batched product per slice.

A decode step with 16 requests over many adapters holds up to 16 adapter groups of one row each.
Two small products per group, layer and slice (server/engine/lora_ops.py) cost the ops'
overhead each, and in bfloat16 on a CPU the tiny products are slower still: on the
many-adapters benchmark's model the products took 78 % of the worker's time with 1,000 adapters.

So the rows of small groups are multiplied together: each row's A and B are gathered from
float32 copies of the slots, at the adapters' own ranks (`Copies`), and two batched products
(`torch.bmm`) give every row its delta. The cost hardly grows with the adapters in a step:
4.2 ms for 4 and 6.2 ms for 16 on one thread, against 15.8 and 57.2 ms for the grouped bfloat16
products (docs/benchmarks.md). Large groups (a prompt's rows) keep their own products, where
gathering a row's matrices would cost more than the product.

The copies follow the slots: `refresh` runs after vLLM copies an adapter into a slot, `forget`
when it resets one; a slot copied any other way has no copy, and its rows take the grouped path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SMALL_GROUP = 8  # groups of fewer rows than this are gathered
MAX_OUTPUT = 16384  # no copies of wider slices (an lm_head's vocabulary): the grouped path serves them


@dataclass
class Copies:
    """Float32 copies of one slice's slots: A (slots, width, in) and B transposed (slots, width, out),
    zero past each slot's rank; `ranks[slot]` is None while the slot holds no copy."""

    a: Any
    b: Any
    ranks: list[int | None]
    sources: tuple[Any, Any] = field(repr=False)  # the slot tensors: kept alive, their ids stay theirs


_COPIES: dict[tuple[int, int], Copies] = {}


def copies(lora_a: Any, lora_b: Any) -> Copies | None:
    return _COPIES.get((id(lora_a), id(lora_b)))


def refresh(lora_a: Any, lora_b: Any, slot: int, rank: int | None) -> None:
    """vLLM copied an adapter of `rank` (0: it leaves this slice alone; None: unknown) into `slot`."""
    import torch

    key = (id(lora_a), id(lora_b))
    found = _COPIES.get(key)
    if rank is None or lora_b.shape[2] > MAX_OUTPUT or (found is None and not rank):
        if found is not None:
            found.ranks[slot] = None
        return  # no copy (for a slice no adapter targets yet, none needed: its products are skipped)
    slots, width = lora_a.shape[0], max(rank, 1)
    if found is None or found.a.shape[1] < width:
        grown = Copies(
            torch.zeros(slots, width, lora_a.shape[3], dtype=torch.float32),
            torch.zeros(slots, width, lora_b.shape[2], dtype=torch.float32),
            [None] * slots if found is None else found.ranks,
            (lora_a, lora_b),
        )
        if found is not None:
            old = found.a.shape[1]
            grown.a[:, :old] = found.a
            grown.b[:, :old] = found.b
        found = _COPIES[key] = grown
    found.a[slot].zero_()
    found.b[slot].zero_()
    if rank:
        found.a[slot, :rank] = lora_a[slot, 0, :rank]
        found.b[slot, :rank] = lora_b[slot, 0, :, :rank].t()
    found.ranks[slot] = rank


def forget(lora_a: Any, slot: int) -> None:
    """vLLM reset `slot`: its copy, in every pair with this A, is stale until the next refresh."""
    for (a_id, _), found in _COPIES.items():
        if a_id == id(lora_a):
            found.ranks[slot] = None


@dataclass
class Plan:
    """A step's rows by adapter slot: groups of SMALL_GROUP rows or more each get their own
    products; the rest (`rows`, with each one's `slots`) are gathered."""

    large: list[tuple[int, Any]]
    small: list[tuple[int, Any]]
    rows: Any = None  # a slice when the small groups' rows are contiguous and in slot order, else a tensor
    slots: Any = None  # each of those rows' slot (a tensor)
    slot_set: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.large or self.small)

    def __iter__(self):  # every (slot, rows), as a plain list of groups
        return iter([*self.large, *self.small])


def plan(groups: list[tuple[int, Any]] | Plan) -> Plan:
    import torch

    if isinstance(groups, Plan):
        return groups
    large, small, rows, slots = [], [], [], []
    for slot, group_rows in groups:
        indices = range(group_rows.start, group_rows.stop) if isinstance(group_rows, slice) else group_rows.tolist()
        if len(indices) >= SMALL_GROUP:
            large.append((slot, group_rows))
        else:
            small.append((slot, group_rows))
            rows.extend(indices)
            slots.extend([slot] * len(indices))
    if not small:
        return Plan(large, small)
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    return Plan(
        large,
        small,
        slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows),
        torch.tensor(slots),
        frozenset(slots),
    )


def step_rank(found: Copies | None, step: Plan) -> int | None:
    """The largest rank among the small groups' slots in `found`; None when a slot has no copy."""
    if found is None:
        return None
    ranks = [found.ranks[slot] for slot in step.slot_set]
    return None if None in ranks else max(ranks, default=0)


def add_gathered(y2: Any, x32: Any, step: Plan, found: Copies, rank: int, offset: int, size: int, scale: float) -> None:
    """y2[rows, offset:offset+size] += x[rows] @ A[slot].T @ B[slot].T * scale for the small groups'
    rows at once, at `rank` (step_rank); `x32` holds those rows' inputs in float32, shaped (rows, 1, in)."""
    import torch

    hidden = torch.bmm(x32, found.a[:, :rank].index_select(0, step.slots).transpose(1, 2))
    if scale != 1.0:
        hidden *= scale
    delta = torch.bmm(hidden, found.b[:, :rank, :size].index_select(0, step.slots))[:, 0].to(y2.dtype)
    add_rows(y2, step.rows, offset, size, delta)


def add_rows(y2: Any, rows: Any, offset: int, size: int, delta: Any) -> None:
    """y2[rows, offset:offset+size] += delta, for `rows` a slice or a tensor of row indices."""
    if isinstance(rows, slice):
        y2[rows, offset : offset + size] += delta
    else:
        y2[:, offset : offset + size].index_add_(0, rows, delta)

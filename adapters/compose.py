"""Composition: several LoRA adapters of one base model made into one PEFT adapter folder.

The methods are those of PEFT's `add_weighted_adapter`, with its semantics, computed in float32
from the inputs' files. Input i has scaling s_i = lora_alpha_i / r_i and delta s_i B_i A_i; the
result has lora_alpha equal to its rank (scaling 1), so the delta served is its B A:

- `cat` is exact: A stacks w_i s_i A_i and B stacks B_i, so B A = sum_i w_i s_i B_i A_i, at
  rank sum_i r_i.
- `svd` is that same sum truncated to `rank` by its singular value decomposition; exact when
  `rank` reaches the sum of the ranks. PEFT decomposes the full out x in matrix; here the sum
  is first factored through QR of its stacked factors, which gives the same decomposition from
  matrices of the sum's rank, so it stays fast on large models.
- `linear`, `ties`, `dare_linear` and `dare_ties` combine the A matrices and the B matrices
  separately, with weights sqrt(|w_i s_i|) (the sign on A), as PEFT does. They need inputs of one
  rank and are approximations: B A then carries cross terms B_i A_j. `ties` keeps the `density`
  largest values of each and elects signs (`majority_sign_method`); `dare_*` keeps a random
  `density` share, rescaled. Its draws come from a generator of its own seeded with `seed`, in
  PEFT's module order, so a seed always gives the same adapter (PEFT draws from torch's global
  generator, which its own setup has moved on). With one input PEFT uses `linear`; so does this.

Refused, because PEFT composes them wrongly: rsLoRA (its scaling is not alpha / r), DoRA (a
magnitude vector no sum of deltas carries) and trained biases.

`Recipe.cache_key` hashes a recipe with its inputs' content hashes, for callers that keep
composed adapters by what they were made from.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.errors import InvalidAdapter, InvalidComposition
from adapters.limits import MAX_CONFIG_BYTES, OverLimit, load_json, lora_alpha_problem, read_capped
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE, content_hash, read_safetensors_header

if TYPE_CHECKING:
    from adapters.registry import AdapterEntry, Registry

README_FILE = "README.md"
METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")
MAX_INPUTS = 16
# Bumped when the same recipe and inputs would give different files.
COMPOSE_VERSION = 1

_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties")
_USES_DENSITY = ("ties", "dare_linear", "dare_ties")
_USES_SIGN = ("ties", "dare_ties")
_USES_SEED = ("dare_linear", "dare_ties")
_TENSOR_NAME = re.compile(
    r"(?P<prefix>.*\.layers\.(?P<layer>\d+)\.\w+\.(?P<module>\w+))\.lora_(?P<ab>[AB])\.weight", re.ASCII
)
# The order in which Llama and Qwen2 declare their projections: PEFT's module order, which
# decides the order of dare's random draws.
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    """How to compose: a method, one weight per input, and that method's own parameters."""

    method: str
    weights: tuple[float, ...]
    rank: int | None = None  # svd: the result's rank
    density: float | None = None  # ties, dare_*: the share of values kept, in (0, 1]
    majority_sign_method: str | None = None  # ties, dare_ties: "total" or "frequency"
    seed: int | None = None  # dare_*: the random draws

    @classmethod
    def of(
        cls,
        method: str = "cat",
        weights: Sequence[float] = (),
        *,
        rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str | None = None,
        seed: int | None = None,
    ) -> Recipe:
        """A checked recipe, with defaults filled in; InvalidComposition says what is wrong."""
        if method not in METHODS:
            raise InvalidComposition(f"method '{method[:40]}' is not one of {', '.join(METHODS)}", param="method")
        if not 1 <= len(weights) <= MAX_INPUTS:
            raise InvalidComposition(f"a composition takes 1 to {MAX_INPUTS} adapters", param="adapters")
        if not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise InvalidComposition("weights must be finite numbers", param="weights")
        _only_for(method, "rank", rank, ("svd",))
        _only_for(method, "density", density, _USES_DENSITY)
        _only_for(method, "majority_sign_method", majority_sign_method, _USES_SIGN)
        _only_for(method, "seed", seed, _USES_SEED)
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise InvalidComposition("rank must be a positive integer", param="rank")
        if method in _USES_DENSITY:
            if density is None:
                raise InvalidComposition(
                    f"method '{method}' needs 'density', the share of values kept, in (0, 1]", param="density"
                )
            if not (isinstance(density, int | float) and 0 < density <= 1):
                raise InvalidComposition("density must be a number in (0, 1]", param="density")
            density = float(density)
        if method in _USES_SIGN:
            majority_sign_method = majority_sign_method or "total"
            if majority_sign_method not in SIGN_METHODS:
                raise InvalidComposition(
                    f"majority_sign_method must be {' or '.join(SIGN_METHODS)}", param="majority_sign_method"
                )
        if method in _USES_SEED:
            seed = 0 if seed is None else seed
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
                raise InvalidComposition("seed must be a non-negative integer", param="seed")
        return cls(method, tuple(float(w) for w in weights), rank, density, majority_sign_method, seed)

    def cache_key(self, input_hashes: Sequence[str]) -> str:
        """A sha256 naming what this recipe makes of inputs with these content hashes."""
        document = {"version": COMPOSE_VERSION, "recipe": asdict(self), "inputs": list(input_hashes)}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _only_for(method: str, field: str, value: object, methods: tuple[str, ...]) -> None:
    if value is not None and method not in methods:
        raise InvalidComposition(f"'{field}' applies to method {' and '.join(methods)} only", param=field)


@dataclass(frozen=True)
class Composition:
    """What `compose` wrote."""

    rank: int
    target_modules: tuple[str, ...]
    exact: bool  # the served delta is the weighted sum of the inputs' deltas
    relative_error: float  # ||served - weighted sum||_F / ||weighted sum||_F, over every module


@dataclass
class _Input:
    label: str
    rank: int
    scaling: float
    config: dict
    # module prefix -> (A, B), float32 tensors
    modules: dict[str, tuple[object, object]]


def compose(
    folders: Sequence[Path],
    recipe: Recipe,
    out: Path,
    *,
    max_rank: int,
    names: Sequence[str] | None = None,
) -> Composition:
    """Compose the adapters in `folders` by `recipe` into a PEFT adapter folder `out`.

    `names` label the inputs in error messages (default: "adapter 1", ...). The result's rank
    may not pass `max_rank` (the server's --max-lora-rank).
    """
    import torch
    from safetensors.torch import save_file

    if len(folders) != len(recipe.weights):
        raise InvalidComposition(
            f"{len(folders)} adapters and {len(recipe.weights)} weights; give one weight per adapter", param="weights"
        )
    labels = list(names or [f"adapter {i + 1}" for i in range(len(folders))])
    inputs = [_read_input(Path(folder), label) for folder, label in zip(folders, labels, strict=True)]
    method = recipe.method
    if len(inputs) == 1 and method in _SAME_RANK:
        method = "linear"  # as PEFT: nothing to prune against or elect
    rank = _result_rank(inputs, recipe, method, max_rank)
    prefixes = sorted({p for i in inputs for p in i.modules}, key=_module_sort_key)
    generator = torch.Generator().manual_seed(recipe.seed) if recipe.seed is not None else None

    tensors: dict[str, torch.Tensor] = {}
    error_sq = total_sq = 0.0
    with torch.no_grad():
        for prefix in prefixes:
            present = [(i, w) for i, w in zip(inputs, recipe.weights, strict=True) if prefix in i.modules]
            if method == "cat":
                lora_a, lora_b = _cat(inputs, recipe.weights, prefix)
            elif method == "svd":
                lora_a, lora_b = _svd(present, prefix, rank)
            else:
                lora_a, lora_b = _task_arithmetic(present, prefix, method, recipe, generator)
            exact_b = torch.cat([i.modules[prefix][1] for i, _ in present], dim=1)
            exact_a = torch.cat([w * i.scaling * i.modules[prefix][0] for i, w in present], dim=0)
            error_sq += _frobenius_sq(torch.cat([exact_b, -lora_b], dim=1), torch.cat([exact_a, lora_a], dim=0))
            total_sq += _frobenius_sq(exact_b, exact_a)
            tensors[f"{prefix}.lora_A.weight"] = lora_a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = lora_b.contiguous()

    targets = tuple(sorted({p.rsplit(".", 1)[-1] for p in prefixes}))
    first = inputs[0].config
    config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(targets),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # One metadata key: safetensors writes several in no fixed order, and the bytes must not vary.
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    provenance = {"recipe": asdict(recipe), "inputs": [content_hash(Path(f)) for f in folders]}
    (out / README_FILE).write_text(
        "# A composed LoRA adapter\n\nMade by lora-gateway (adapters/compose.py) from adapters with these content "
        f"hashes:\n\n```json\n{json.dumps(provenance, indent=2, sort_keys=True)}\n```\n",
        encoding="utf-8",
    )
    exact = (
        method == "cat"
        or (method == "svd" and rank >= sum(i.rank for i in inputs))
        or (method == "linear" and len(inputs) == 1)
    )
    relative_error = math.sqrt(max(error_sq, 0.0) / total_sq) if total_sq > 0 else 0.0
    return Composition(rank, targets, exact, relative_error)


def _read_input(folder: Path, label: str):
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = load_json(read_capped(folder / CONFIG_FILE, MAX_CONFIG_BYTES))
        read_safetensors_header(folder / WEIGHTS_FILE)  # its size and nesting, before safetensors parses it
        raw = load_file(str(folder / WEIGHTS_FILE))
    except (OverLimit, InvalidAdapter) as exc:
        shown = f"{CONFIG_FILE} {exc}" if isinstance(exc, OverLimit) else str(exc)
        raise InvalidComposition(f"{label}: {shown}") from None
    except (OSError, ValueError, SafetensorError):
        raise InvalidComposition(f"{label}: its files cannot be read as a PEFT LoRA adapter") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidComposition(f"{label} is not a LoRA adapter")
    if config.get("use_rslora"):
        raise InvalidComposition(
            f"{label} is an rsLoRA adapter (scaling alpha/sqrt(r)), which PEFT's composition scales wrongly"
        )
    if config.get("use_dora"):
        raise InvalidComposition(f"{label} is a DoRA adapter; its magnitude vector cannot be composed")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise InvalidComposition(f"{label} has trained biases, which composition would drop")
    if config.get("fan_in_fan_out"):
        raise InvalidComposition(f"{label} stores its weights transposed (fan_in_fan_out); that is not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not isinstance(alpha, int | float):
        raise InvalidComposition(f"{label}: its adapter_config.json needs an integer r and a numeric lora_alpha")
    if problem := lora_alpha_problem(alpha, rank):
        raise InvalidComposition(f"{label}: {problem}")
    modules: dict[str, list] = {}
    for name, tensor in raw.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            raise InvalidComposition(f"{label}: tensor '{name[:120]}' is not a LoRA A/B weight of a decoder layer")
        pair = modules.setdefault(match["prefix"], [None, None])
        pair[0 if match["ab"] == "A" else 1] = tensor.to(torch.float32)
    for prefix, (lora_a, lora_b) in modules.items():
        if lora_a is None or lora_b is None:
            raise InvalidComposition(f"{label}: {prefix} has only one of lora_A and lora_B")
    return _Input(label, rank, alpha / rank, config, {p: (a, b) for p, (a, b) in modules.items()})


def _result_rank(inputs: list[_Input], recipe: Recipe, method: str, max_rank: int) -> int:
    ranks = [i.rank for i in inputs]
    if method == "cat":
        total = sum(ranks)
        if total > max_rank:
            sums = " + ".join(map(str, ranks))
            raise InvalidComposition(
                f"cat gives rank {total} ({sums}), above --max-lora-rank {max_rank}; "
                f"use method svd with a rank of at most {max_rank}",
                param="method",
            )
        return total
    if method == "svd":
        rank = recipe.rank if recipe.rank is not None else min(sum(ranks), max_rank)
        if rank > max_rank:
            raise InvalidComposition(f"rank {rank} is above --max-lora-rank {max_rank}", param="rank")
        return rank
    if len(set(ranks)) != 1:
        shown = ", ".join(f"{i.label} has {i.rank}" for i in inputs)
        raise InvalidComposition(
            f"method '{method}' needs adapters of one rank ({shown}); cat and svd take any ranks", param="method"
        )
    return ranks[0]


def _module_sort_key(prefix: str) -> tuple[int, int, str]:
    match = re.search(r"\.layers\.(\d+)\.\w+\.(\w+)\Z", prefix, re.ASCII)
    assert match is not None
    module = match[2]
    order = _MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER)
    return int(match[1]), order, module


def _shapes(inputs: list[_Input], prefix: str) -> tuple[int, int]:
    lora_a, lora_b = next(i.modules[prefix] for i in inputs if prefix in i.modules)
    return lora_a.shape[1], lora_b.shape[0]


def _cat(inputs: list[_Input], weights: Sequence[float], prefix: str):
    import torch

    in_features, out_features = _shapes(inputs, prefix)
    parts_a, parts_b = [], []
    for item, weight in zip(inputs, weights, strict=True):
        if prefix in item.modules:
            lora_a, lora_b = item.modules[prefix]
            parts_a.append(lora_a * (weight * item.scaling))
            parts_b.append(lora_b)
        else:  # this input leaves the module alone: its slice of the rank adds nothing
            parts_a.append(torch.zeros(item.rank, in_features))
            parts_b.append(torch.zeros(out_features, item.rank))
    return torch.cat(parts_a, dim=0), torch.cat(parts_b, dim=1)


def _svd(present: list[tuple[_Input, float]], prefix: str, rank: int):
    import torch

    stacked_b = torch.cat([i.modules[prefix][1] for i, _ in present], dim=1)  # out x R
    stacked_a = torch.cat([w * i.scaling * i.modules[prefix][0] for i, w in present], dim=0)  # R x in
    # delta = Qb (Rb Ra^T) Qa^T; the SVD of the small middle factor is the SVD of delta.
    q_b, r_b = torch.linalg.qr(stacked_b)
    q_a, r_a = torch.linalg.qr(stacked_a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    kept = min(rank, s.shape[0])
    lora_b = torch.zeros(stacked_b.shape[0], rank)
    lora_a = torch.zeros(rank, stacked_a.shape[1])
    lora_b[:, :kept] = (q_b @ u[:, :kept]) * s[:kept]
    lora_a[:kept] = vh[:kept] @ q_a.T
    return lora_a, lora_b


def _task_arithmetic(present: list[tuple[_Input, float]], prefix: str, method: str, recipe: Recipe, generator):
    """PEFT's _generalized_task_arithmetic_weighted_adapter: A and B combined separately."""
    import torch

    weights_a, weights_b = [], []
    for item, weight in present:
        scaled = weight * item.scaling
        weights_a.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
        weights_b.append(math.sqrt(abs(scaled)))
    combined = []
    for side, weights in ((0, weights_a), (1, weights_b)):
        tensors = [item.modules[prefix][side] for item, _ in present]
        combined.append(_combine(tensors, torch.tensor(weights), method, recipe, generator))
    return combined[0], combined[1]


def _combine(tensors: list, weights, method: str, recipe: Recipe, generator):
    """PEFT's merge_utils: task_arithmetic, ties, dare_linear and dare_ties, on one side."""
    import torch

    density = recipe.density if recipe.density is not None else 1.0
    if method == "ties":
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))
    if method not in _USES_SIGN:
        return weighted.sum(dim=0)
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if recipe.majority_sign_method == "total" else sign.sum(dim=0)
    mask = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _magnitude_prune(tensor, density: float):
    import torch

    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    top = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor, density: float, generator):
    import torch

    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _frobenius_sq(lora_b, lora_a) -> float:
    """||B A||_F^2 without forming B A: trace((B^T B)(A A^T)), in float64."""
    b64, a64 = lora_b.double(), lora_a.double()
    return float(((b64.T @ b64) * (a64 @ a64.T)).sum())


async def compose_registered(
    registry: Registry,
    owner: str,
    name: str,
    inputs: Sequence[AdapterEntry],
    recipe: Recipe,
    labels: Sequence[str],
    *,
    max_adapters: int | None = None,
) -> tuple[AdapterEntry, Composition]:
    """Compose registered adapters from the store's copies, and register the result as owner's `name`.

    The result is validated and loaded like any adapter (rank, shapes, the engine's add_lora);
    the composition runs in the registry's work pool. `max_adapters`: the owner's quota, which
    the catalog checks as it writes the row.
    """
    if registry.store is None or registry.rules is None:
        raise RuntimeError("this registry has no store")
    store, max_rank = registry.store, registry.rules.max_rank
    results: list[Composition] = []

    def fill(staging: Path) -> None:
        folders = [store.ensure_local(entry.spec.content_hash) for entry in inputs]
        results.append(compose(folders, recipe, staging, max_rank=max_rank, names=labels))

    entry = await registry.add_folder(owner, name, fill, max_adapters=max_adapters)
    return entry, results[0]

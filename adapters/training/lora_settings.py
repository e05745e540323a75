"""The LoRA settings of a fine-tuning job, as in PEFT's `LoraConfig`, checked against the base model.

Everything is refused here that would give an adapter the gateway could not then serve: a rank
the engine does not take, or a target module the base does not have.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapters.base_model import BaseModelInfo
from adapters.errors import InvalidTrainingSettings
from adapters.limits import lora_alpha_problem

DEFAULT_RANK = 8
DEFAULT_ALPHA = 16
# The ranks vLLM's LoRA kernels accept (its --max-lora-rank choices).
ENGINE_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout")

_LAYER_WEIGHT = re.compile(r"\.layers\.\d+\.(?:self_attn|mlp)\.(\w+)\.weight\Z", re.ASCII)
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class LoraSettings:
    """Rank, scale, targets and dropout of the adapter to train (PEFT's LoraConfig fields)."""

    r: int = DEFAULT_RANK
    lora_alpha: float = DEFAULT_ALPHA
    target_modules: tuple[str, ...] | None = None  # None: every projection the base has
    lora_dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraSettings:
        targets = values.get("target_modules")
        return cls(**{**values, "target_modules": None if targets is None else tuple(targets)})


def base_target_modules(base_model_dir: Path) -> tuple[str, ...]:
    """The attention and MLP projections an adapter may target in this base, in the config's order.

    The config says which projections a Llama- or Qwen2-family model has; where the weights'
    tensor names can be read, only those the weights hold are kept.
    """
    base_model_dir = Path(base_model_dir)
    names = BaseModelInfo.from_model_dir(base_model_dir).module_names
    if (in_weights := _weight_module_names(base_model_dir)) is not None:
        names = tuple(name for name in names if name in in_weights)
    return names


def resolve_lora_settings(requested: dict[str, Any] | None, base_model_dir: Path, max_lora_rank: int) -> LoraSettings:
    """Defaults filled in, and every value checked; raise InvalidTrainingSettings naming the field."""
    requested = dict(requested or {})
    if unknown := sorted(set(requested) - set(FIELDS)):
        raise InvalidTrainingSettings(
            f"unknown LoRA setting '{unknown[0]}'; the settings are {', '.join(FIELDS)}", param=unknown[0]
        )
    available = base_target_modules(base_model_dir)
    rank = _rank(requested.get("r"), max_lora_rank)
    return LoraSettings(
        r=rank,
        lora_alpha=_alpha(requested.get("lora_alpha"), rank),
        target_modules=_targets(requested.get("target_modules"), available),
        lora_dropout=_dropout(requested.get("lora_dropout")),
    )


def _rank(value: Any, max_lora_rank: int) -> int:
    if value is None:
        value = DEFAULT_RANK
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTrainingSettings("r must be a whole number", param="r")
    allowed = [rank for rank in ENGINE_RANKS if rank <= max_lora_rank]
    if value not in ENGINE_RANKS:
        raise InvalidTrainingSettings(
            f"r {value} is not a rank the serving engine accepts; use one of {', '.join(map(str, allowed))}",
            param="r",
        )
    if value > max_lora_rank:
        raise InvalidTrainingSettings(
            f"r {value} exceeds --max-lora-rank {max_lora_rank}; use one of {', '.join(map(str, allowed))}",
            param="r",
        )
    return value


def _alpha(value: Any, rank: int) -> float:
    if value is None:
        return DEFAULT_ALPHA
    # The bound serving applies (adapters/limits.py): a job must not train what it cannot serve.
    if problem := lora_alpha_problem(value, rank):
        raise InvalidTrainingSettings(problem, param="lora_alpha")
    return value


def _dropout(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTrainingSettings("lora_dropout must be a number", param="lora_dropout")
    if not 0 <= value < 1:  # also refuses NaN
        raise InvalidTrainingSettings(
            f"lora_dropout is {value}; it must be at least 0 and below 1", param="lora_dropout"
        )
    return float(value)


def _targets(value: Any, available: tuple[str, ...]) -> tuple[str, ...]:
    if value is None or value == "all-linear":  # PEFT's name for every projection
        return available
    if isinstance(value, str):
        raise InvalidTrainingSettings(
            f"target_modules must be a list of module names (the base has {', '.join(available)})",
            param="target_modules",
        )
    if not isinstance(value, list) or not value or not all(isinstance(name, str) for name in value):
        raise InvalidTrainingSettings(
            f"target_modules must be a non-empty list of module names (the base has {', '.join(available)})",
            param="target_modules",
        )
    if unknown := [name for name in dict.fromkeys(value) if name not in available]:
        shown = ", ".join(name[:40] for name in unknown[:5])
        raise InvalidTrainingSettings(
            f"target modules {shown} are not in the base model; it has {', '.join(available)}",
            param="target_modules",
        )
    # In the base's order, each once: the adapter's config then reads the same however it was asked.
    return tuple(name for name in available if name in value)


def _weight_module_names(base_model_dir: Path) -> set[str] | None:
    """Module names of the layer weights, from the safetensors index or headers; None if unreadable."""
    tensor_names: list[str] = []
    index = base_model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            tensor_names = list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        else:
            for path in sorted(base_model_dir.glob("*.safetensors")):
                tensor_names += _safetensors_names(path)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    names = {match.group(1) for name in tensor_names if (match := _LAYER_WEIGHT.search(name))}
    return names or None


def _safetensors_names(path: Path) -> list[str]:
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > _MAX_HEADER_BYTES:
            raise ValueError("safetensors header too large")
        header = json.loads(handle.read(header_len))
    return [name for name in header if name != "__metadata__"]

"""OpenAI's fine-tuning hyperparameters, "auto" or given, resolved into the numbers a job trains with.

The rules, as they may be copied into the documentation:

- **Learning rate.** The rate is `BASE_LEARNING_RATE` (1e-3) times `learning_rate_multiplier`.
  "auto" is 1.0 for a base model whose hidden size is at most 1024 and `1024 / hidden_size` above
  that (0.25, so 2.5e-4, for a 4096-wide 7-8B model): LoRA's usual rates are about 2e-4 for
  billion-parameter models, while small models learn far too slowly at that rate. The rate decays
  linearly to 0 over the job, after no warm-up; the optimizer is AdamW with no weight decay.
  The multiplier must be a number in (0, 100].
- **Epochs.** "auto" aims at about 3 epochs, but so that the job sees at least 100 examples (small
  files get more epochs, at most 25) and at most 25,000 (large files get fewer, at least 1), as
  OpenAI's rule does: `n_epochs = 3`, raised to `min(25, 100 // examples)` when
  `3 * examples < 100`, lowered to `max(1, 25000 // examples)` when `3 * examples > 25000`.
  Given values are whole numbers from 1 to 50.
- **Batch size.** "auto" is `examples // 100` clamped to 1..16: one example per step up to a few
  hundred examples, where every update counts; 16 from 1,600 examples, which keeps the steps of a
  large file on a CPU few. Given values are whole numbers from 1 to 256, and a batch never holds
  more than the file's examples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adapters.errors import InvalidTrainingSettings

BASE_LEARNING_RATE = 1e-3
# The width above which "auto" scales the rate down, in proportion to it.
FULL_RATE_HIDDEN_SIZE = 1024
MAX_LEARNING_RATE_MULTIPLIER = 100.0

TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25
MAX_EPOCHS = 50

EXAMPLES_PER_AUTO_BATCH = 100
MAX_AUTO_BATCH_SIZE = 16
MAX_BATCH_SIZE = 256

FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier")


@dataclass(frozen=True)
class Hyperparameters:
    """Concrete values a job trains with; `learning_rate` is the base rate times the multiplier."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Hyperparameters:
        return cls(**values)


def resolve_hyperparameters(
    requested: dict[str, Any] | None, *, examples: int, hidden_size: int | None = None
) -> Hyperparameters:
    """Fill in "auto" (or missing) values from the number of training examples and the base's width.

    Raises InvalidTrainingSettings, with `param` naming the field, for unknown fields and for values
    of the wrong type or out of range.
    """
    if examples < 1:
        raise ValueError("examples must be at least 1")
    requested = dict(requested or {})
    if unknown := sorted(set(requested) - set(FIELDS)):
        raise InvalidTrainingSettings(
            f"unknown hyperparameter '{unknown[0]}'; the hyperparameters are {', '.join(FIELDS)}",
            param=unknown[0],
        )
    n_epochs = _whole(requested, "n_epochs", 1, MAX_EPOCHS)
    batch_size = _whole(requested, "batch_size", 1, MAX_BATCH_SIZE)
    multiplier = _multiplier(requested)
    if n_epochs is None:
        n_epochs = auto_epochs(examples)
    if batch_size is None:
        batch_size = auto_batch_size(examples)
    if multiplier is None:
        multiplier = auto_learning_rate_multiplier(hidden_size)
    return Hyperparameters(
        n_epochs=n_epochs,
        batch_size=min(batch_size, examples),
        learning_rate_multiplier=multiplier,
        learning_rate=BASE_LEARNING_RATE * multiplier,
    )


def auto_epochs(examples: int) -> int:
    if TARGET_EPOCHS * examples < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, MIN_TARGET_EXAMPLES // examples)
    if TARGET_EPOCHS * examples > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // examples)
    return TARGET_EPOCHS


def auto_batch_size(examples: int) -> int:
    return max(1, min(MAX_AUTO_BATCH_SIZE, examples // EXAMPLES_PER_AUTO_BATCH))


def auto_learning_rate_multiplier(hidden_size: int | None) -> float:
    if hidden_size is None or hidden_size <= FULL_RATE_HIDDEN_SIZE:
        return 1.0
    return FULL_RATE_HIDDEN_SIZE / hidden_size


def _is_auto(requested: dict[str, Any], field: str) -> bool:
    return requested.get(field, "auto") in ("auto", None)


def _whole(requested: dict[str, Any], field: str, low: int, high: int) -> int | None:
    if _is_auto(requested, field):
        return None
    value = requested[field]
    # JSON clients may send 3.0 for 3; a fraction of an epoch or of an example is refused.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTrainingSettings(f'{field} must be a whole number or "auto"', param=field)
    if not low <= value <= high:
        raise InvalidTrainingSettings(f"{field} is {value}; it must be from {low} to {high}", param=field)
    return value


def _multiplier(requested: dict[str, Any]) -> float | None:
    field = "learning_rate_multiplier"
    if _is_auto(requested, field):
        return None
    value = requested[field]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTrainingSettings(f'{field} must be a number or "auto"', param=field)
    if not 0 < value <= MAX_LEARNING_RATE_MULTIPLIER:  # also refuses NaN
        raise InvalidTrainingSettings(
            f"{field} is {value}; it must be above 0 and at most {MAX_LEARNING_RATE_MULTIPLIER:g}", param=field
        )
    return float(value)

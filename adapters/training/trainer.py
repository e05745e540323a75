"""The training loop: a LoRA adapter trained with PEFT on a data file, reporting as it goes.

A plain PyTorch loop rather than transformers' Trainer: it is a few dozen lines, starts faster,
and lets a cancel be seen between any two steps. Everything runs in float32 with a fixed seed, so
one spec trains the same adapter on one machine every time.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapters.errors import InvalidTrainingSettings
from adapters.training.data import IGNORE_INDEX, TokenizedExample, load_examples
from adapters.training.hyperparams import Hyperparameters
from adapters.training.lora_settings import LoraSettings, base_target_modules

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]
ShouldStop = Callable[[], bool]

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
METRICS_CSV = "metrics.csv"
METRICS_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
# What the saved adapter_config.json names as its base: never a path on this server.
DEFAULT_BASE_MODEL_NAME = "base"
# Metrics events per job, about: every step of a small job, a sample of a large one (metrics.csv
# holds every step either way).
_METRICS_EVENTS = 200


@dataclass(frozen=True)
class TrainingSpec:
    """Everything one training run needs; `to_json` and `from_json` carry it to the worker process."""

    base_model_dir: str
    training_file: str
    out_dir: str
    hyperparameters: Hyperparameters
    lora: LoraSettings = field(default_factory=LoraSettings)
    validation_file: str | None = None
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    max_length: int = 1024
    base_model_name: str = DEFAULT_BASE_MODEL_NAME

    def to_json(self) -> str:
        values = asdict(self)
        values["hyperparameters"] = self.hyperparameters.to_dict()
        values["lora"] = self.lora.to_dict()
        return json.dumps(values, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingSpec:
        values = json.loads(text)
        values["hyperparameters"] = Hyperparameters.from_dict(values["hyperparameters"])
        values["lora"] = LoraSettings.from_dict(values["lora"])
        return cls(**values)


def train(spec: TrainingSpec, emit: Emit, should_stop: ShouldStop) -> None:
    """Train an adapter into spec.out_dir, emitting events; return early, after a "cancelled"
    event, once should_stop() is true. Raises AdapterError subclasses for what the caller got wrong."""
    import torch

    started = time.monotonic()
    torch.manual_seed(spec.seed)
    torch.set_num_threads(max(1, spec.threads))
    device = _device(torch, spec.device)
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def info(message: str, level: str = "info") -> None:
        emit({"type": "message", "level": level, "message": message})

    info("loading the base model")
    tokenizer, model = _load_base(spec, device)
    warn = lambda message: info(message, "warning")  # noqa: E731
    training = load_examples(Path(spec.training_file), tokenizer, spec.max_length, warn=warn)
    validation = (
        load_examples(Path(spec.validation_file), tokenizer, spec.max_length, warn=warn)
        if spec.validation_file
        else None
    )
    truncated = sum(example.truncated for example in training)
    if truncated:
        info(f"{truncated} training example(s) cut to max_length {spec.max_length} tokens", "warning")

    model = _with_lora(model, spec.lora, Path(spec.base_model_dir))
    params = spec.hyperparameters
    batch_size = min(params.batch_size, len(training))
    steps_per_epoch = math.ceil(len(training) / batch_size)
    total_steps = steps_per_epoch * params.n_epochs
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
    # Linear decay to zero over the job, as OpenAI's and transformers' defaults do, no warm-up.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: 1.0 - done / total_steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = torch.Generator().manual_seed(spec.seed)
    metrics_every = max(1, total_steps // _METRICS_EVENTS)
    info(
        f"training on {len(training)} examples for {params.n_epochs} epochs of {steps_per_epoch} steps "
        f"(batch size {batch_size}, learning rate {params.learning_rate:g}, LoRA r {spec.lora.r}), "
        f"{total_steps} steps in all"
    )

    trained_tokens = 0
    step = 0
    training_started = time.monotonic()
    with _MetricsFile(out_dir / METRICS_CSV) as metrics_file:
        for epoch in range(1, params.n_epochs + 1):
            model.train()
            permutation = torch.randperm(len(training), generator=order).tolist()
            for first in range(0, len(training), batch_size):
                if should_stop():
                    emit({"type": "cancelled"})
                    return
                batch = [training[index] for index in permutation[first : first + batch_size]]
                learning_rate = scheduler.get_last_lr()[0]
                loss, accuracy = _loss(model, _collate(torch, batch, pad_id, device))
                if not math.isfinite(loss.item()):
                    raise InvalidTrainingSettings(
                        f"training diverged at step {step + 1} (the loss is not finite); "
                        "lower learning_rate_multiplier",
                        param="learning_rate_multiplier",
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                trained_tokens += sum(len(example.input_ids) for example in batch)
                train_loss = loss.item()
                row = {"step": step, "train_loss": train_loss, "train_accuracy": accuracy}
                event = {
                    "type": "metrics",
                    "step": step,
                    "total_steps": total_steps,
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "learning_rate": learning_rate,
                }
                epoch_ends = first + batch_size >= len(training)
                if epoch_ends and validation is not None:
                    valid = _evaluate(torch, model, validation, batch_size, pad_id, device, should_stop)
                    if valid is None:
                        emit({"type": "cancelled"})
                        return
                    row["valid_loss"], row["valid_mean_token_accuracy"] = valid
                    event["valid_loss"] = valid[0]
                metrics_file.write(row)
                if epoch_ends or step % metrics_every == 0:
                    emit(event)
            relative = f"{CHECKPOINTS_DIR}/epoch-{epoch}"
            _save_adapter(model, out_dir / relative, spec.base_model_name)
            checkpoint = {
                "type": "checkpoint",
                "epoch": epoch,
                "step": step,
                "path": relative,
                "train_loss": train_loss,
            }
            if "valid_loss" in event:
                checkpoint["valid_loss"] = event["valid_loss"]
            emit(checkpoint)
            info(f"epoch {epoch}/{params.n_epochs} done at step {step} ({time.monotonic() - started:.1f} s)")

    _save_adapter(model, out_dir / ADAPTER_DIR, spec.base_model_name)
    info(
        f"trained {trained_tokens} tokens in {time.monotonic() - training_started:.1f} s "
        f"({time.monotonic() - started:.1f} s with loading)"
    )
    emit(
        {"type": "succeeded", "adapter_dir": ADAPTER_DIR, "metrics_csv": METRICS_CSV, "trained_tokens": trained_tokens}
    )


def _device(torch: Any, name: str):
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidTrainingSettings(
            f"device '{name}' is not a device name; use cpu or cuda", param="device"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidTrainingSettings("device 'cuda' is not available on this machine; use cpu", param="device")
    if device.type not in ("cpu", "cuda"):
        raise InvalidTrainingSettings(f"device '{name}' is not supported; use cpu or cuda", param="device")
    return device


def _load_base(spec: TrainingSpec, device: Any):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # events say enough, and stdout is for events
    tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(spec.base_model_dir, dtype=torch.float32)
    return tokenizer, model.to(device)


def _with_lora(model: Any, settings: LoraSettings, base_model_dir: Path):
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules or base_target_modules(base_model_dir)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.lora_alpha,
        target_modules=list(targets),
        lora_dropout=settings.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _collate(torch: Any, batch: list[TokenizedExample], pad_id: int, device: Any) -> dict[str, Any]:
    width = max(len(example.input_ids) for example in batch)
    input_ids, labels, attention = [], [], []
    for example in batch:
        padding = width - len(example.input_ids)
        input_ids.append(example.input_ids + [pad_id] * padding)
        labels.append(example.labels + [IGNORE_INDEX] * padding)
        attention.append([1] * len(example.input_ids) + [0] * padding)
    return {
        "input_ids": torch.tensor(input_ids, device=device),
        "attention_mask": torch.tensor(attention, device=device),
        "labels": torch.tensor(labels, device=device),
    }


def _loss(model: Any, batch: dict[str, Any]):
    """Mean cross-entropy over the batch's learnt tokens, and the share of them predicted exactly."""
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # The logits at position i predict the token at i + 1.
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    learnt = labels != IGNORE_INDEX
    accuracy = ((logits.argmax(-1) == labels) & learnt).sum().item() / max(1, learnt.sum().item())
    return loss, accuracy


def _evaluate(torch, model, examples, batch_size, pad_id, device, should_stop) -> tuple[float, float] | None:
    """Validation loss and token accuracy, weighted by learnt tokens; None if stopped meanwhile."""
    model.eval()
    loss_sum = correct = tokens = 0.0
    with torch.no_grad():
        for first in range(0, len(examples), batch_size):
            if should_stop():
                return None
            batch = examples[first : first + batch_size]
            learnt = sum(example.learnt_tokens for example in batch)
            loss, accuracy = _loss(model, _collate(torch, batch, pad_id, device))
            loss_sum += loss.item() * learnt
            correct += accuracy * learnt
            tokens += learnt
    model.train()
    return loss_sum / tokens, correct / tokens


def _save_adapter(model: Any, folder: Path, base_model_name: str) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # PEFT writes the base's path here, which would tell a tenant where this server keeps models.
    config["base_model_name_or_path"] = base_model_name
    # PEFT keeps the targets in a set, whose order follows PYTHONHASHSEED; sorted, a rerun writes
    # the same file.
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # PEFT's model card repeats the base's path; the gateway needs none.
    (folder / "README.md").unlink(missing_ok=True)


class _MetricsFile:
    """metrics.csv, one row per step, written as it goes so a cancelled job keeps its history."""

    def __init__(self, path: Path):
        self._path = path

    def __enter__(self) -> _MetricsFile:
        self._handle = self._path.open("w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._handle, fieldnames=METRICS_COLUMNS, restval="")
        self._writer.writeheader()
        return self

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow(
            {key: f"{value:.6f}" if isinstance(value, float) else value for key, value in row.items()}
        )
        self._handle.flush()

    def __exit__(self, *exc_info: object) -> None:
        self._handle.close()

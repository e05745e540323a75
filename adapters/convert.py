"""Adapters in the forms training scripts write, turned into PEFT safetensors adapters.

- PEFT's `adapter_model.bin` (older PEFT, or `safe_serialization=False`): the same tensors,
  re-saved as `adapter_model.safetensors` beside the same `adapter_config.json`.
- MiniMind's LoRA `.pth`: `{module}.lora.A.weight` and `{module}.lora.B.weight` for each
  adapted linear layer. MiniMind adds `B(A(x))` unscaled, so the PEFT adapter gets
  `lora_alpha = r` (PEFT scales by alpha / r). The rank is A's first dimension; the target
  modules are the adapted modules' names.

Both are pickles, read only through `adapters.sandbox`. Conversion happens in staging: the result
is then validated like any adapter, and the pickle is deleted before anything is stored.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.errors import InvalidAdapter
from adapters.limits import MAX_CONFIG_BYTES
from adapters.sandbox import DEFAULT_LIMITS, SandboxLimits, load_pickled_tensors
from adapters.spec import AdapterSpec
from adapters.validate import CONFIG_FILE, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)

PEFT = "peft"
MINIMIND = "minimind"
SOURCE_FORMATS = (PEFT, MINIMIND)
MINIMIND_FILE = "minimind_lora.pth"  # what a staged MiniMind upload is called
MINIMIND_LABEL = "the MiniMind LoRA file"

# Matched whole (fullmatch): "$" would also take a key that ends in a newline.
_PEFT_KEY = re.compile(r"base_model\.model\.[\w.]+\.lora_[AB]\.weight", re.ASCII)
_MINIMIND_KEY = re.compile(
    r"(?:module\.)?(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.lora\.([AB])\.weight", re.ASCII
)
_MAX_ECHOED_KEY = 80


def check_format(source_format: str) -> str:
    if source_format not in SOURCE_FORMATS:
        raise InvalidAdapter(
            f"format must be one of {', '.join(SOURCE_FORMATS)}, not {source_format[:40]!r}", param="format"
        )
    return source_format


def needs_sandbox(staging: Path, source_format: str) -> bool:
    """Whether `convert_staged` would load a pickle here (in the sandbox), so the caller takes a slot first."""
    if source_format == MINIMIND:
        return True
    return (staging / PICKLED_WEIGHTS_FILE).exists() and not (staging / WEIGHTS_FILE).exists()


def convert_staged(staging: Path, source_format: str = PEFT, limits: SandboxLimits = DEFAULT_LIMITS) -> None:
    """Turn a staged adapter into PEFT safetensors in place; no pickle is left behind.

    PEFT: a folder with adapter_model.bin and no safetensors is converted; with both, the
    safetensors win (as in PEFT) and the pickle is deleted unread. MiniMind: the staged
    MINIMIND_FILE becomes adapter_config.json and adapter_model.safetensors.
    """
    check_format(source_format)
    if source_format == MINIMIND:
        source = staging / MINIMIND_FILE
        others = sorted(p.name for p in staging.iterdir() if p.name != MINIMIND_FILE)
        if not source.is_file() or others:
            raise InvalidAdapter("format=minimind takes exactly one file: the .pth MiniMind's save_lora wrote")
        write_minimind_adapter(load_pickled_tensors(source, MINIMIND_LABEL, limits), staging)
        source.unlink()
        return
    pickled = staging / PICKLED_WEIGHTS_FILE
    if not pickled.exists():
        return
    if (staging / WEIGHTS_FILE).exists():
        logger.info("adapter has both %s and %s; serving the safetensors", PICKLED_WEIGHTS_FILE, WEIGHTS_FILE)
    else:
        _check_config_size(staging)
        write_peft_weights(load_pickled_tensors(pickled, PICKLED_WEIGHTS_FILE, limits), staging / WEIGHTS_FILE)
    pickled.unlink()


def write_peft_weights(tensors: dict[str, Any], dest: Path) -> None:
    """Save PEFT's state dict as safetensors, once every name is a PEFT LoRA weight's."""
    from safetensors.torch import save_file

    for name in tensors:
        if not isinstance(name, str) or not _PEFT_KEY.fullmatch(name):
            raise InvalidAdapter(
                f"{PICKLED_WEIGHTS_FILE}: tensor {_shown(name)} is not a PEFT LoRA weight "
                "(base_model.model.<module>.lora_A.weight or .lora_B.weight)"
            )
    save_file(dict(sorted(tensors.items())), str(dest), metadata={"format": "pt"})


def minimind_to_peft(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """MiniMind's LoRA state dict as PEFT's: (tensors by PEFT name, adapter_config.json)."""
    pairs: dict[str, dict[str, Any]] = {}
    targets: set[str] = set()
    for key, tensor in tensors.items():
        match = _MINIMIND_KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise InvalidAdapter(
                f"{MINIMIND_LABEL}: key {_shown(key)} is not a MiniMind LoRA weight "
                "(model.layers.<n>.<self_attn|mlp>.<module>.lora.A.weight or .lora.B.weight)"
            )
        module, target, half = match.groups()
        if half in pairs.setdefault(module, {}):
            raise InvalidAdapter(f"{MINIMIND_LABEL}: {module}.lora.{half} appears twice (with and without 'module.')")
        if tensor.dim() != 2:
            raise InvalidAdapter(f"{MINIMIND_LABEL}: {module}.lora.{half}.weight is not a matrix")
        pairs[module][half] = tensor
        targets.add(target)
    rank = None
    converted = {}
    for module, pair in sorted(pairs.items()):
        missing = {"A", "B"} - set(pair)
        if missing:
            raise InvalidAdapter(f"{MINIMIND_LABEL}: {module} has no lora.{missing.pop()}.weight")
        a, b = pair["A"], pair["B"]
        module_rank = a.shape[0]
        if b.shape[1] != module_rank:
            raise InvalidAdapter(
                f"{MINIMIND_LABEL}: {module}.lora.B has shape {list(b.shape)}; "
                f"lora.A's rank {module_rank} needs [out_features, {module_rank}]"
            )
        if rank is None:
            rank = module_rank
        elif module_rank != rank:
            raise InvalidAdapter(
                f"{MINIMIND_LABEL}: ranks differ ({rank} and {module_rank} at {module}); one rank only"
            )
        converted[f"base_model.model.{module}.lora_A.weight"] = a
        converted[f"base_model.model.{module}.lora_B.weight"] = b
    if rank is None:
        raise InvalidAdapter(f"{MINIMIND_LABEL} holds no LoRA weights")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,  # MiniMind adds B(A(x)) unscaled; PEFT scales by lora_alpha / r
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    return converted, config


def write_minimind_adapter(tensors: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Write MiniMind's LoRA tensors into `folder` as a PEFT adapter; returns its config."""
    from safetensors.torch import save_file

    converted, config = minimind_to_peft(tensors)
    save_file(converted, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return config


def convert_into(
    source: Path,
    out: Path,
    source_format: str,
    *,
    limits: SandboxLimits = DEFAULT_LIMITS,
    validate: Callable[[Path], AdapterSpec] | None = None,
) -> AdapterSpec | None:
    """Offline conversion: a PEFT folder with adapter_model.bin, or a MiniMind .pth, into `out`.

    `out` (absent, or an empty folder) appears only once the conversion, and `validate` when
    given, succeeded. Of a PEFT folder only the adapter's own files are read.
    """
    check_format(source_format)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        if source_format == MINIMIND:
            if not source.is_file():
                raise InvalidAdapter(f"{source} is not a file; --format minimind takes the .pth file")
            shutil.copyfile(source, work / MINIMIND_FILE)
        else:
            if not source.is_dir():
                raise InvalidAdapter(f"{source} is not a folder; --format peft takes the adapter's folder")
            if not (source / PICKLED_WEIGHTS_FILE).is_file():
                raise InvalidAdapter(f"{source} holds no {PICKLED_WEIGHTS_FILE}; there is nothing to convert")
            _check_config_size(source)
            for name in (CONFIG_FILE, PICKLED_WEIGHTS_FILE, "README.md"):  # not a trainer's other files
                if (source / name).is_file():
                    shutil.copyfile(source / name, work / name, follow_symlinks=False)
        convert_staged(work, source_format, limits)
        spec = validate(work) if validate is not None else None
        work.replace(out)  # onto an empty folder too
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return spec


def _check_config_size(folder: Path) -> None:
    # Validation would refuse it too, once the sandbox had spent its seconds on the pickle.
    config = folder / CONFIG_FILE
    if config.is_file() and config.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes; at most {MAX_CONFIG_BYTES} are accepted")


def _shown(key: object) -> str:
    text = repr(key)
    return text if len(text) <= _MAX_ECHOED_KEY else text[:_MAX_ECHOED_KEY] + "..."

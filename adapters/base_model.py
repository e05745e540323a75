"""The base model's linear-layer shapes, read from its config.json: what an adapter must fit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Module name -> (input features, output features) as functions of the config.
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BaseModelInfo:
    """Layer count and per-module (in, out) features of a Llama- or Qwen2-family model."""

    num_layers: int
    module_shapes: dict[str, tuple[int, int]]

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(self.module_shapes)

    @classmethod
    def from_config(cls, config: dict) -> BaseModelInfo:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        intermediate = int(config["intermediate_size"])
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        }
        return cls(num_layers=int(config["num_hidden_layers"]), module_shapes=shapes)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseModelInfo:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        # Multimodal wrappers keep the language model's numbers under text_config.
        return cls.from_config(config.get("text_config") or config)

    def layer_prefix(self, layer: int, module: str) -> str:
        group = "self_attn" if module in _ATTENTION else "mlp"
        return f"base_model.model.model.layers.{layer}.{group}.{module}"

"""The base model's linear-layer shapes, read from its config.json: what an adapter must fit."""

from __future__ import annotations

import hashlib
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
    vocab_size: int = 0

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
        vocab = int(config.get("vocab_size") or 0)
        return cls(num_layers=int(config["num_hidden_layers"]), module_shapes=shapes, vocab_size=vocab)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> BaseModelInfo:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        # Multimodal wrappers keep the language model's numbers under text_config.
        return cls.from_config(config.get("text_config") or config)

    def slot_bytes(self, rank: int, dtype_bytes: int) -> int:
        """What one adapter slot of the engine takes: vLLM keeps, per slot, A and B at the largest
        rank for every linear layer it can adapt (whatever an adapter targets) and the lm_head."""
        per_layer = sum(inputs + outputs for inputs, outputs in self.module_shapes.values())
        hidden = self.module_shapes["q_proj"][0]
        return rank * dtype_bytes * (per_layer * self.num_layers + hidden + self.vocab_size)

    def layer_prefix(self, layer: int, module: str) -> str:
        group = "self_attn" if module in _ATTENTION else "mlp"
        return f"base_model.model.model.layers.{layer}.{group}.{module}"


# What identifies a base model's numbers; the weights add their sizes and sampled bytes.
_FINGERPRINT_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "merges.txt")
_SAMPLE_BYTES = 1 << 20


def fingerprint(model_dir: Path) -> str:
    """A sha256 over the base model's config numbers, vocabulary files and weight files.

    Weights are not read whole (a base may be tens of GB): each file counts by name, size, and
    its first and last MiB, which for safetensors hold the tensor index and real weights. Two
    bases whose shapes match but whose weights differ get different fingerprints.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    numbers = config.get("text_config") or config
    digest = hashlib.sha256()
    digest.update(json.dumps({k: numbers.get(k) for k in _FINGERPRINT_KEYS}, sort_keys=True).encode())
    for path in sorted(model_dir.iterdir()):
        if path.name in _VOCAB_FILES and path.is_file():
            digest.update(f"vocab {path.name}\n".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        elif path.suffix in _WEIGHT_SUFFIXES and path.is_file():
            size = path.stat().st_size
            digest.update(f"weights {path.name} {size}\n".encode())
            with path.open("rb") as weights:
                digest.update(weights.read(_SAMPLE_BYTES))
                if size > 2 * _SAMPLE_BYTES:
                    weights.seek(size - _SAMPLE_BYTES)
                    digest.update(weights.read(_SAMPLE_BYTES))
    return digest.hexdigest()

"""Hugging Face PEFT's greedy output for the base model and each adapter: the parity oracle."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class PeftReference:
    """Greedy generation with transformers + peft on the same files the gateway serves."""

    def __init__(self, base_path: Path, adapters: dict[str, Path]):
        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
        names = sorted(adapters)
        self.model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0]).eval()
        for name in names[1:]:
            self.model.load_adapter(adapters[name], adapter_name=name)
        self._cached = cache(self._generate)

    def completion(self, adapter: str | None, prompt: str, max_tokens: int) -> str:
        return self.tokenizer.decode(self.completion_ids(adapter, prompt, max_tokens), skip_special_tokens=True)

    def completion_ids(self, adapter: str | None, prompt: str, max_tokens: int) -> list[int]:
        """The generated token ids, the stop token (EOS) included, as vLLM reports them."""
        return list(self._cached(adapter, tuple(self.tokenizer.encode(prompt)), max_tokens))

    def chat(self, adapter: str | None, messages: tuple[tuple[str, str], ...], max_tokens: int) -> str:
        text = self.tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        ids = self._cached(adapter, tuple(self.tokenizer.encode(text, add_special_tokens=False)), max_tokens)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prompt_logprobs(self, adapter: str | None, prompt_ids: list[int]) -> torch.Tensor:
        """Log-softmax over the vocabulary at each prompt position: row i scores the token at i + 1."""
        inputs = torch.tensor([prompt_ids])
        with torch.no_grad():
            if adapter is None:
                with self.model.disable_adapter():
                    logits = self.model(inputs, attention_mask=torch.ones_like(inputs)).logits
            else:
                self.model.set_adapter(adapter)
                logits = self.model(inputs, attention_mask=torch.ones_like(inputs)).logits
        return torch.log_softmax(logits[0].float(), dim=-1)

    def _generate(self, adapter: str | None, prompt_ids: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
        inputs = torch.tensor([prompt_ids])
        kwargs = {
            "max_new_tokens": max_tokens,
            "do_sample": False,
            "attention_mask": torch.ones_like(inputs),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        with torch.no_grad():
            if adapter is None:
                with self.model.disable_adapter():
                    output = self.model.generate(inputs, **kwargs)
            else:
                self.model.set_adapter(adapter)
                output = self.model.generate(inputs, **kwargs)
        return tuple(output[0, len(prompt_ids) :].tolist())

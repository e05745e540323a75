"""Tokenizing prompts and chats the way vLLM's server does, shared by both engines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Tokenizing:
    """An engine's prompt side: `_tokenizer` and `_max_model_len` are set by the engine."""

    _tokenizer: Any
    _max_model_len: int

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return len(self._tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        text = self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        # The template writes its own special tokens, as vLLM's server assumes too.
        return self._tokenizer.encode(text, add_special_tokens=False)

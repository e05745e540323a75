"""Tokenizing prompts and chats the way vLLM's server does, shared by both engines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 6


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

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self._tokenizer.all_special_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of these tokens, special ones included, as vLLM's /detokenize gives it."""
        return self._tokenizer.decode(list(token_ids))

    def token_pieces(self, token_ids: Sequence[int]) -> list[str]:
        """The vocabulary's own strings for these tokens (vLLM's `token_strs`)."""
        return self._tokenizer.convert_ids_to_tokens(list(token_ids))

    def token_texts(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> list[str]:
        """The text each token adds after `context` (the tokens before it), as TGI reports tokens.

        Decoding a token alone loses what it shares with its neighbours (a SentencePiece leading
        space, a multi-byte character), so each is decoded after a few tokens of context and the
        context's own text cut off, as incremental detokenizers do.
        """
        ids = [*context[-_CONTEXT_TOKENS:], *token_ids]
        start = len(ids) - len(token_ids)
        texts = []
        for i in range(start, len(ids)):
            before = ids[max(0, i - _CONTEXT_TOKENS) : i]
            prefix = self._tokenizer.decode(before)
            whole = self._tokenizer.decode([*before, ids[i]])
            texts.append(whole[len(prefix) :] if whole.startswith(prefix) else self._tokenizer.decode([ids[i]]))
        return texts

    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        text = self._tokenizer.apply_chat_template(
            list(messages), tools=list(tools) if tools else None, add_generation_prompt=True, tokenize=False
        )
        # The template writes its own special tokens, as vLLM's server assumes too.
        return self._tokenizer.encode(text, add_special_tokens=False)

    def tool_parser(self, name: str, tools: Sequence[dict[str, Any]]) -> Any:
        """A fresh parser for one choice (server/engine/tool_parsers.py)."""
        from server.engine.tool_parsers import ToolCallParser

        return ToolCallParser(name, self._tokenizer, list(tools))

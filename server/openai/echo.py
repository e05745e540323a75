"""Completions' `echo`: the prompt comes back before each choice's text, and, with `logprobs`, each
prompt token's logprob and top alternatives before the completion's own (the first token has
none: nothing comes before it). This is what evaluation harnesses read to score a text.

Tokens and offsets are vLLM's: each token as the engine decodes it alone, and `text_offset`
counting the characters of the tokens listed before it, from the first prompt token on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.engine.protocol import ChoiceDelta, PromptToken, TokenLogprob
from server.openai.generation import Generator

LogprobRow = tuple[str, float | None, dict[str, float] | None]


async def prompt_texts(generator: Generator, prompts: Sequence[str | list[int]]) -> list[str]:
    """Each prompt's text: as the caller wrote it, or its token ids decoded."""
    ids = [prompt for prompt in prompts if not isinstance(prompt, str)]
    decoded = iter(await generator.decode(ids) if ids else [])
    return [prompt if isinstance(prompt, str) else next(decoded) for prompt in prompts]


def echoed(
    prompt_text: str,
    prompt_tokens: list[PromptToken] | None,
    text: str,
    entries: list[TokenLogprob] | None,
    *,
    want_logprobs: bool,
    only_prompt: bool,
) -> tuple[str, dict[str, list[Any]] | None]:
    """A choice's text and logprobs object with the prompt before them; `only_prompt` (max_tokens
    0) drops what was generated, which the engine needs one token of to run at all."""
    if only_prompt:
        text, entries = "", []
    if not want_logprobs:
        return prompt_text + text, None
    rows: list[LogprobRow] = [(token.text, token.logprob, token.top) for token in prompt_tokens or ()]
    rows += [(entry.token, entry.logprob, entry.top) for entry in entries or ()]
    return prompt_text + text, logprobs_object(rows, 0)


def continued(
    text: str, entries: list[TokenLogprob] | None, *, want_logprobs: bool, only_prompt: bool, offset: int
) -> tuple[str, dict[str, list[Any]] | None]:
    """A later streamed delta of an echoed choice; nothing of it when only the prompt was asked for."""
    if only_prompt:
        text, entries = "", []
    if not want_logprobs:
        return text, None
    return text, logprobs_object([(entry.token, entry.logprob, entry.top) for entry in entries or ()], offset)


def logprobs_object(rows: list[LogprobRow], offset: int) -> dict[str, list[Any]]:
    """The legacy completions logprobs object, offsets counted from `offset`."""
    offsets = []
    for token, _, _ in rows:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": [token for token, _, _ in rows],
        "token_logprobs": [logprob for _, logprob, _ in rows],
        "top_logprobs": [top for _, _, top in rows],
        "text_offset": offsets,
    }


def end_offset(logprobs: dict[str, list[Any]] | None, fallback: int) -> int:
    """Where the next streamed token's offset starts, after the tokens of this logprobs object."""
    if not logprobs or not logprobs["tokens"]:
        return fallback
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


class Echoing:
    """Echo's state for one request: each prompt's text, and which choices have had theirs."""

    def __init__(self, prompt_texts: list[str], want_logprobs: bool, only_prompt: bool):
        self.prompt_texts = prompt_texts
        self.want_logprobs = want_logprobs
        self.only_prompt = only_prompt
        self.started: set[int] = set()

    def apply(
        self, prompt_index: int, prompt: list[PromptToken] | None, text: str, entries: list[TokenLogprob] | None
    ) -> tuple[str, dict[str, list[Any]] | None]:
        return echoed(
            self.prompt_texts[prompt_index],
            prompt,
            text,
            entries,
            want_logprobs=self.want_logprobs,
            only_prompt=self.only_prompt,
        )

    def stream(
        self, index: int, prompt_index: int, prompt: list[PromptToken] | None, delta: ChoiceDelta, offset: int
    ) -> tuple[str, dict[str, list[Any]] | None]:
        if index not in self.started:
            self.started.add(index)
            return self.apply(prompt_index, prompt, delta.text, delta.logprobs)
        return continued(
            delta.text, delta.logprobs, want_logprobs=self.want_logprobs, only_prompt=self.only_prompt, offset=offset
        )

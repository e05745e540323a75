"""A hand-written engine for fast tests: predictable text, recorded calls."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from adapters.engine import AdapterLoadFailed
from adapters.spec import AdapterSpec
from server.engine.protocol import (
    AdapterHandle,
    ChoiceDelta,
    EngineDead,
    GenerationStep,
    OutputConstraint,
    PromptToken,
    SamplingOptions,
    TokenLogprob,
)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def fake_spec(name: str, rank: int = 8) -> AdapterSpec:
    return AdapterSpec(Path("/nowhere") / name, rank, ("q_proj", "v_proj"), 1234, f"hash-{name}")


class FakeEngine:
    """Answers `"<adapter> " + words` one word per step; records every call.

    Its adapter cache works as vLLM's worker's: least recently used out first once it holds
    `cache_size` adapters; a request for an adapter it does not hold loads it from its path
    (`reloaded`); add_adapter on one it holds only refreshes its place.
    """

    vocab_size = 300
    special_token_ids = frozenset({0, 1})  # 1 starts every encoded prompt
    BASE_WORD = "base-model"  # what a request without an adapter says

    def __init__(self, max_model_len: int = 64, cache_size: int = 1000):
        self._max_model_len = max_model_len
        self.cache_size = cache_size
        self.cache: OrderedDict[int, str] = OrderedDict()  # adapter id -> name, oldest first
        self.reloaded: list[int] = []
        self.healthy = True
        self.generated: list[tuple[str, list[int], SamplingOptions, AdapterHandle | None]] = []
        self.constraints: list[OutputConstraint | None] = []  # each generation's structured-output constraint
        self.added: list[int] = []
        self.tokenized: list[tuple[str, bool]] = []  # (text, whether on the event loop) of each encode
        self.removed: list[int] = []
        self.rendered: list[list[dict[str, Any]]] = []  # the messages of each chat rendered
        self.refuse_paths: set[str] = set()
        self.refuse_all = False
        self.release: asyncio.Event | None = None  # when set by a test, generation waits for it
        self.failed_in_flight = False  # fail_in_flight was called: held generations end with EngineDead
        self.running = 0
        self.shut_down = False

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def is_healthy(self) -> bool:
        return self.healthy

    def fail_in_flight(self) -> None:
        self.failed_in_flight = True
        if self.release is not None:
            self.release.set()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.tokenized.append((text, _on_event_loop()))
        return [1] * add_special_tokens + [b % 255 + 2 for b in text.encode()]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.token_pieces(token_ids))

    def token_pieces(self, token_ids: Sequence[int]) -> list[str]:
        return [f"<{t}>" for t in token_ids]

    @staticmethod
    def prompt_logprobs(prompt_token_ids: list[int], top: int | None) -> list[PromptToken] | None:
        """Each prompt token at -1.0 but the first, with `top` alternatives: "x" at -2.0, then "y"..."""
        if top is None:
            return None
        others = {name: -2.0 - i for i, name in enumerate("xyzuv"[:top])}
        return [
            PromptToken(t, None, f"<{t}>") if i == 0 else PromptToken(t, -1.0, f"<{t}>", {f"<{t}>": -1.0} | others)
            for i, t in enumerate(prompt_token_ids)
        ]

    def token_texts(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> list[str]:
        return [f"<{t}>" for t in token_ids]

    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        self.rendered.append(list(messages))
        names = ",".join(tool["function"]["name"] for tool in tools or ())
        return self.encode(names + "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def tool_parser(self, name: str, tools: Sequence[dict[str, Any]]) -> Any:
        raise AssertionError("the fake engine has no tool-call parser")

    @staticmethod
    def words(adapter_name: str, max_tokens: int) -> list[str]:
        base = adapter_name.split("@")[0]
        return [f"{base}-{i} " for i in range(max_tokens)]

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions, adapter: AdapterHandle | None
    ) -> AsyncIterator[GenerationStep]:
        if not self.healthy:
            raise EngineDead("dead")
        self.generated.append((request_id, prompt_token_ids, options, adapter))
        self.constraints.append(options.constraint)
        if adapter is not None:
            if adapter.adapter_id not in self.cache:
                self.reloaded.append(adapter.adapter_id)
            self._cache(adapter)
        self.running += 1
        try:
            if self.release is not None:
                await self.release.wait()
            if self.failed_in_flight:
                raise EngineDead("dead")
            words = self.words(adapter.name if adapter is not None else self.BASE_WORD, options.max_tokens)
            for i, word in enumerate(words):
                if any(stop in word for stop in options.stop):
                    words = words[:i]
                    break
            finish = "length" if len(words) == options.max_tokens else "stop"

            def logprobs(word: str) -> list[TokenLogprob] | None:
                if options.logprobs is None:
                    return None
                return [TokenLogprob(word, -0.5, {word: -0.5, "x": -1.5})]

            if options.stream:
                for i, word in enumerate(words):
                    await asyncio.sleep(0)
                    last = i == len(words) - 1
                    yield GenerationStep(
                        len(prompt_token_ids),
                        [
                            ChoiceDelta(c, word, 1, logprobs(word), finish if last else None, [100 + i])
                            for c in range(options.n)
                        ],
                        finished=last,
                        prompt_logprobs=self.prompt_logprobs(prompt_token_ids, options.prompt_logprobs)
                        if i == 0
                        else None,
                    )
            else:
                text = "".join(words)
                prompt_logprobs = self.prompt_logprobs(prompt_token_ids, options.prompt_logprobs)
                yield GenerationStep(
                    len(prompt_token_ids),
                    [
                        ChoiceDelta(
                            c,
                            text,
                            len(words),
                            [lp for w in words for lp in logprobs(w)] if options.logprobs is not None else None,
                            finish,
                            [100 + i for i in range(len(words))],
                        )
                        for c in range(options.n)
                    ],
                    finished=True,
                    prompt_logprobs=prompt_logprobs,
                )
        finally:
            self.running -= 1

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        if self.refuse_all or adapter.path in self.refuse_paths:
            raise AdapterLoadFailed("refused")
        self.added.append(adapter.adapter_id)
        self._cache(adapter)

    def _cache(self, adapter: AdapterHandle) -> None:
        self.cache[adapter.adapter_id] = adapter.name
        self.cache.move_to_end(adapter.adapter_id)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    async def remove_adapter(self, adapter_id: int) -> None:
        self.removed.append(adapter_id)
        self.cache.pop(adapter_id, None)

    async def shutdown(self) -> None:
        self.shut_down = True

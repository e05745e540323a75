"""What the gateway needs from an engine, in types that do not mention vLLM.

`server/engine/vllm_engine.py` implements this on vLLM; the tests' `FakeEngine` implements it in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from adapters.engine import AdapterEngine, AdapterHandle

# Taken from the priority of a light tenant's request that may preempt (server/engine/fair_scheduler.py).
URGENT_PRIORITY = 1 << 50


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """A grammar the output must follow (vLLM's structured outputs); exactly one field is set.

    The protocol layers (OpenAI's `response_format` and `structured_outputs`, forced tool calls,
    TGI's `grammar`) build it; the engine turns it into its own structured-output parameters.
    """

    json_schema: str | None = None  # a JSON Schema, as JSON text (hashable, and cached by text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # an EBNF / Lark grammar, as vLLM takes it


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """Sampling parameters, already validated by the protocol models."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    stream: bool = False
    min_tokens: int = 0
    ignore_eos: bool = False
    top_k: int = 0  # 0: every token
    repetition_penalty: float = 1.0
    # Each prompt token's logprob and this many top alternatives, on the generation's first step; None: none.
    prompt_logprobs: int | None = None
    include_stop_str: bool = False  # the text keeps the stop sequence that ended it, as TGI's does
    constraint: OutputConstraint | None = None  # structured output; None: unconstrained
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True  # False keeps special tokens in the text (some tool-call syntaxes use them)
    # Not sampling but scheduling: the engine's queue serves lower first (server/openai/fairness.py);
    # below -URGENT_PRIORITY / 2, the engine preempts a running request for it when its batch is full.
    priority: int = 0


@dataclass(slots=True)
class TokenLogprob:
    """One generated token with its logprob and the top alternatives."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one choice since the previous step (all of it when not streaming)."""

    index: int
    text: str
    token_count: int
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class PromptToken:
    """One prompt token with its logprob; the first has none, since nothing comes before it."""

    token_id: int
    logprob: float | None
    text: str = ""  # the token as the engine decodes it alone, when it reports alternatives
    top: dict[str, float] | None = None  # the token itself and the top alternatives; None for the first


@dataclass(slots=True)
class GenerationStep:
    """One step of a generation: the choices that moved, and the token counts so far."""

    prompt_tokens: int
    choices: list[ChoiceDelta]
    finished: bool
    replica: str | None = None  # which engine replica ran it, when there are several
    prompt_logprobs: list[PromptToken] | None = None  # with SamplingOptions.prompt_logprobs


@dataclass(slots=True)
class ToolCallDelta:
    """A streamed piece of a tool call: its first carries id and name, later ones argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass(slots=True)
class ParsedCalls:
    """A whole response read by a tool-call parser: (name, JSON arguments) per call, and the rest."""

    content: str | None
    calls: list[tuple[str, str]]


class ToolParsing(Protocol):
    """One choice's tool-call parser (`--tool-call-parser`)."""

    skip_special_tokens: bool

    def extract(self, text: str) -> ParsedCalls: ...

    def extract_delta(
        self, delta_text: str, delta_token_ids: Sequence[int]
    ) -> tuple[str | None, list[ToolCallDelta]]: ...

    def unstreamed_arguments(self) -> tuple[int, str]: ...


class EngineDead(Exception):
    """The engine can no longer serve any request."""


class EngineRejected(Exception):
    """The engine refused this request's input (for example, too long)."""


class Engine(AdapterEngine, Protocol):
    """One base model, many adapters."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def is_healthy(self) -> bool: ...

    @property
    def special_token_ids(self) -> frozenset[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def token_pieces(self, token_ids: Sequence[int]) -> list[str]: ...

    def token_texts(self, token_ids: Sequence[int], context: Sequence[int] = ()) -> list[str]: ...

    def render_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]: ...

    def tool_parser(self, name: str, tools: Sequence[dict[str, Any]]) -> ToolParsing: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
    ) -> AsyncIterator[GenerationStep]: ...

    def fail_in_flight(self) -> None:
        """Once the engine has died: end each generation still waiting on it with EngineDead."""
        ...

    async def shutdown(self) -> None: ...

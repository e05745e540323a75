"""Running one OpenAI request on the engine: fit checks, adapter lease, batch fan-out, errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from adapters.errors import AdapterNotFound
from adapters.registry import AdapterEntry, Registry
from adapters.spec import SHARED
from adapters.store import copy_folder
from adapters.validate import NAME_PATTERN
from server.engine.protocol import (
    ChoiceDelta,
    Engine,
    EngineDead,
    EngineRejected,
    GenerationStep,
    PromptToken,
    SamplingOptions,
    TokenLogprob,
)
from server.http.auth import Principal
from server.http.errors import (
    ContextLengthExceeded,
    EngineUnavailable,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    TooManySequences,
)
from server.http.observe import RequestRecord
from server.http.priority import is_background
from server.http.tenancy import TenantNotFound, Tenants
from server.openai.fairness import ADMIN_KEY, FairQueue, Turn

ENGINE_DEAD_MESSAGE = "the inference engine has stopped; retry against another replica"
# --max-prompt-chars by default: a prompt that fills the context at this many characters a token
# (English averages about four) is longer than any that could fit it.
PROMPT_CHARS_PER_TOKEN = 32
TOKENIZER_THREADS = 2
# Shorter texts are tokenized on the event loop: a thread hop costs more than tokenizing them.
INLINE_TOKENIZE_CHARS = 256

T = TypeVar("T")


@dataclass
class Job:
    """A validated request: which model, which prompts (token ids), how to sample."""

    request_id: str
    model: str
    prompts: list[list[int]]
    options: SamplingOptions
    record: RequestRecord
    admission: Admission
    return_token_ids: bool = False  # vLLM's extension: each choice also carries its token ids

    def with_ids(self, choice: dict, token_ids: list[int]) -> dict:
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return choice


@dataclass
class Admission:
    """A request let in: its sequences, counted against its tenant and the gateway, how to give them
    back, and (once resolved) the adapter it runs through."""

    sequences: int
    release: Callable[[], None]
    entry: AdapterEntry | None = None
    tenant: str | None = None  # None: the admin's or shared traffic

    @contextmanager
    def released_on_error(self) -> Iterator[None]:
        """Give the sequences back if preparing the request fails; once it runs, its job does."""
        try:
            yield
        except BaseException:
            self.release()
            raise

    @contextmanager
    def released_at_end(self) -> Iterator[None]:
        """Give the sequences back when the request ends, also when the client left before its job
        ever ran (a job cancelled before its first step never reaches its own `finally`)."""
        try:
            yield
        finally:
            self.release()


@dataclass
class ChoiceResult:
    """One finished choice of a non-streamed request."""

    index: int
    text: str = ""
    token_count: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class Outcome:
    choices: list[ChoiceResult] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    prompt_logprobs: dict[int, list[PromptToken]] = field(default_factory=dict)  # by prompt index


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Generator:
    """Turns jobs into engine generations through the registry's leases."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        tenants: Tenants | None = None,
        adapter_dir: Path | None = None,
        max_in_flight: int = 256,
        *,
        max_sequences: int = 64,
        max_prompt_chars: int | None = None,
        fair_queue: FairQueue | None = None,
        admin_weight: float = 1.0,
        tool_call_parser: str | None = None,
    ):
        self.engine = engine
        self.registry = registry
        self.tenants = tenants
        self.adapter_dir = adapter_dir
        self.max_in_flight = max_in_flight
        self.max_sequences = max_sequences
        self.max_prompt_chars = max_prompt_chars or engine.max_model_len * PROMPT_CHARS_PER_TOKEN
        self.tool_call_parser = tool_call_parser  # --tool-call-parser, with --enable-auto-tool-choice
        self.in_flight = 0  # sequences, not requests
        # Who goes into the engine next (server/openai/fairness.py); by default nobody waits here.
        self.fair_queue = fair_queue or FairQueue(max_in_flight)
        self.admin_weight = admin_weight
        self._first_use: dict[str, asyncio.Lock] = {}
        self._tokenizer_slots = asyncio.Semaphore(TOKENIZER_THREADS)

    async def resolve(self, model: str, principal: Principal) -> AdapterEntry:
        """The adapter `model` names for this caller: 404 (or 503) before anything starts."""
        if not self.engine.is_healthy:
            raise EngineUnavailable(ENGINE_DEAD_MESSAGE)
        try:
            return self.registry.resolve(model, tenant=principal.tenant, admin=principal.admin)
        except AdapterNotFound:
            entry = await self._register_from_adapter_dir(model)
            if entry is None:
                raise
            return entry

    def check_sequences(self, prompts: int, n: int) -> int:
        """The sequences a request fans out to (prompts × n); 400 past --max-sequences-per-request."""
        sequences = prompts * n
        if sequences > self.max_sequences:
            raise TooManySequences(
                f"this request asks for {sequences} sequences ({prompts} prompt{'s' * (prompts != 1)} × n {n}); "
                f"one request may ask for at most {self.max_sequences} (--max-sequences-per-request): "
                "send fewer prompts or a lower n",
                param="n" if n > 1 else "prompt",
            )
        return sequences

    def check_prompt_chars(self, chars: int, param: str) -> None:
        """400 for a prompt over --max-prompt-chars, before anything tokenizes it."""
        if chars > self.max_prompt_chars:
            raise PromptTooLong(chars, self.max_prompt_chars, param)

    def check_chat_size(self, messages: list[dict[str, Any]]) -> None:
        """400 for a chat whose contents are over --max-prompt-chars, or with more messages than the
        context has tokens (each renders to one at least)."""
        self.check_prompt_chars(sum(len(message["content"]) for message in messages), "messages")
        limit = self.engine.max_model_len
        if len(messages) > limit:
            raise ContextLengthExceeded(
                f"{len(messages)} messages cannot fit this model's context of {limit} tokens", param="messages"
            )

    def admit(self, principal: Principal, sequences: int = 1) -> Admission:
        """Count the request's sequences against the gateway's bound (503) and its tenant's limits (429).

        Every request comes here before any work on it, whether its model exists or not.
        """
        if sequences > self.max_in_flight:
            raise TooManySequences(
                f"this request asks for {sequences} sequences; this gateway runs at most {self.max_in_flight} "
                "at once (--max-in-flight): lower n, or send fewer prompts",
                param="n",
            )
        if self.in_flight + sequences > self.max_in_flight:
            raise Overloaded(
                f"the gateway is at its limit of {self.max_in_flight} sequences in flight; retry shortly",
                headers={"Retry-After": "1"},
            )
        tenant_release = (
            self.tenants.admit(principal.tenant, sequences) if self.tenants and principal.tenant else _nothing
        )
        self.in_flight += sequences
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= sequences
                tenant_release()

        return Admission(sequences, release, tenant=principal.tenant)

    async def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids, tokenized off the event loop."""
        return await self._tokenizing(lambda: [self.engine.encode(text) for text in texts], sum(map(len, texts)))

    async def decode(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """Each token sequence's text, decoded off the event loop."""
        return await self._tokenizing(lambda: [self.engine.decode(ids) for ids in batch], sum(map(len, batch)))

    async def tokenizing(self, work: Callable[[], T], chars: int) -> T:
        """Run tokenizer work, off the event loop past a few hundred characters, in the tokenizer pool."""
        return await self._tokenizing(work, chars)

    async def prompt_ids(self, prompts: list[str | list[int]], max_tokens: int) -> list[list[int]]:
        """Completions' prompts as token ids, each checked to fit the context with max_tokens."""
        encoded = iter(await self.encode([prompt for prompt in prompts if isinstance(prompt, str)]))
        batch = []
        for prompt in prompts:
            ids = next(encoded) if isinstance(prompt, str) else prompt
            self.check_fits(ids, max_tokens, "prompt")
            if not isinstance(prompt, str):  # only ids the caller gave can be out of the vocabulary
                self.check_token_ids(ids)
            batch.append(ids)
        return batch

    def tool_parsers(self) -> Callable[[list[dict[str, Any]]], Any] | None:
        """A fresh tool-call parser per choice, when `auto` tool choice is on."""
        if (name := self.tool_call_parser) is None:
            return None
        return lambda tools: self.engine.tool_parser(name, tools)

    async def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The chat template's prompt for `messages`, rendered and tokenized off the event loop."""
        chars = sum(len(message["content"]) for message in messages)
        return await self._tokenizing(lambda: self.engine.render_chat(messages, tools), chars)

    async def _tokenizing(self, work: Callable[[], T], chars: int) -> T:
        if chars <= INLINE_TOKENIZE_CHARS:
            return work()
        # The slot is held until the thread ends, even when the request is cancelled meanwhile, so
        # that clients which leave cannot pile up tokenizer threads.
        await self._tokenizer_slots.acquire()
        try:
            future = asyncio.get_running_loop().run_in_executor(None, work)
        except BaseException:
            self._tokenizer_slots.release()
            raise
        future.add_done_callback(self._tokenizer_done)
        return await asyncio.shield(future)

    def _tokenizer_done(self, future: asyncio.Future) -> None:
        self._tokenizer_slots.release()
        if not future.cancelled():
            future.exception()  # retrieved here when the request that waited for it has left

    async def _register_from_adapter_dir(self, model: str) -> AdapterEntry | None:
        """Like vLLM's filesystem resolver: a shared adapter from --adapter-dir, on first use."""
        if self.adapter_dir is None or not NAME_PATTERN.fullmatch(model) or model == self.registry.base_name:
            return None
        folder = self.adapter_dir / model
        if not folder.is_dir():
            return None
        lock = self._first_use.setdefault(model, asyncio.Lock())
        async with lock:
            entry = self.registry.find(SHARED, model)
            if entry is None:
                rules = self.registry.rules
                max_bytes = rules.max_bytes if rules else 0
                entry = await self.registry.add_folder(
                    SHARED, model, lambda staging: copy_folder(folder, staging, max_bytes)
                )
        self._first_use.pop(model, None)
        return entry

    def check_fits(self, prompt_ids: list[int], max_tokens: int | None, prompt_param: str, min_tokens: int = 0) -> int:
        """The max_tokens to use; 400 when prompt plus max_tokens exceed the context, or min_tokens the room."""
        limit = self.engine.max_model_len
        if len(prompt_ids) >= limit:
            raise ContextLengthExceeded(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {limit} tokens",
                param=prompt_param,
            )
        room = limit - len(prompt_ids)
        if max_tokens is None:
            if min_tokens > room:
                raise InvalidRequest(
                    f"min_tokens ({min_tokens}) exceeds the {room} tokens this model's context of {limit} leaves "
                    f"after the prompt ({len(prompt_ids)} tokens); lower min_tokens to {room} or less",
                    param="min_tokens",
                )
            return room
        if max_tokens > room:
            raise ContextLengthExceeded(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"this model's context of {limit} tokens; lower max_tokens to {room} or less",
                param="max_tokens",
            )
        return max_tokens

    def check_token_ids(self, prompt_ids: list[int]) -> None:
        vocab = self.engine.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be between 0 and {vocab - 1}", param="prompt")

    async def complete(self, job: Job) -> Outcome:
        """Run every prompt of the job to the end; choices ordered by index."""
        outcome = Outcome()
        results: dict[int, ChoiceResult] = {}
        async for prompt_index, step in self._steps(job):
            for choice in step.choices:
                index = prompt_index * job.options.n + choice.index
                result = results.setdefault(index, ChoiceResult(index))
                _accumulate(result, choice)
            if step.finished:
                outcome.usage.prompt_tokens += step.prompt_tokens
            if step.prompt_logprobs is not None:
                outcome.prompt_logprobs.setdefault(prompt_index, step.prompt_logprobs)
        outcome.choices = [results[i] for i in sorted(results)]
        outcome.usage.completion_tokens = sum(c.token_count for c in outcome.choices)
        return outcome

    async def stream(self, job: Job) -> AsyncIterator[tuple[int, GenerationStep, bool]]:
        """Steps of every prompt as they come: (prompt index, step, whether it ends the job)."""
        unfinished = len(job.prompts)
        async for prompt_index, step in self._steps(job):
            unfinished -= step.finished
            yield prompt_index, step, unfinished == 0

    def _share(self, tenant: str | None) -> tuple[str, float]:
        """The fair queue's key and weight for a request of `tenant`."""
        if tenant is None or self.tenants is None:
            return ADMIN_KEY, self.admin_weight
        try:
            return tenant, self.tenants.limits(tenant).weight
        except TenantNotFound:  # deleted while its request was being prepared
            return tenant, 1.0

    async def _turn(self, job: Job) -> Turn:
        """Wait for this job's turn in the engine (batch lines after interactive requests); 503 if the
        engine died meanwhile."""
        key, weight = self._share(job.admission.tenant)
        prompt_tokens = sum(len(prompt) for prompt in job.prompts)
        turn = await self.fair_queue.turn(
            key,
            weight,
            job.admission.sequences,
            prompt_tokens,
            output_tokens=job.options.max_tokens * job.admission.sequences,
            background=is_background(),
        )
        if not self.engine.is_healthy:
            turn.release()
            raise EngineDead
        return turn

    async def _steps(self, job: Job) -> AsyncIterator[tuple[int, GenerationStep]]:
        turn: Turn | None = None
        try:
            turn = await self._turn(job)
            options = replace(job.options, priority=turn.priority)  # the engine's queue keeps the fair order
            async with self.registry.lease(job.admission.entry) as adapter:  # type: ignore[arg-type]
                if len(job.prompts) == 1:
                    steps = _single(self.engine.generate(job.request_id, job.prompts[0], options, adapter))
                else:
                    steps = _merge(
                        [
                            self.engine.generate(f"{job.request_id}-{i}", prompt, options, adapter)
                            for i, prompt in enumerate(job.prompts)
                        ]
                    )
                async for prompt_index, step in steps:
                    if step.replica is not None:
                        job.record.replica = step.replica
                    produced = sum(choice.token_count for choice in step.choices)
                    job.record.tokens_arrived(produced)
                    turn.served(produced)
                    if step.finished:
                        job.record.prompt_tokens += step.prompt_tokens
                        turn.finished(job.options.n)
                    yield prompt_index, step
        except EngineDead:
            raise EngineUnavailable(ENGINE_DEAD_MESSAGE) from None
        except EngineRejected as exc:
            raise InvalidRequest(str(exc)) from None
        finally:
            if turn is not None:
                turn.release()
            job.admission.release()


def _nothing() -> None:
    pass


def _accumulate(result: ChoiceResult, choice: ChoiceDelta) -> None:
    result.text += choice.text
    result.token_count += choice.token_count
    result.token_ids += choice.token_ids
    if choice.logprobs is not None:
        result.logprobs = (result.logprobs or []) + choice.logprobs
    if choice.finish_reason is not None:
        result.finish_reason = choice.finish_reason


async def _single(stream: AsyncIterator[GenerationStep]) -> AsyncIterator[tuple[int, GenerationStep]]:
    async for step in stream:
        yield 0, step


async def _merge(streams: list[AsyncIterator[GenerationStep]]) -> AsyncIterator[tuple[int, GenerationStep]]:
    """Interleave several generations; cancelling the consumer cancels them all."""
    queue: asyncio.Queue[tuple[int, GenerationStep] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationStep]) -> None:
        try:
            async for step in stream:
                await queue.put((index, step))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)
            return
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def get_generator(request: Request) -> Generator:
    return request.app.state.generator


GeneratorDep = Annotated[Generator, Depends(get_generator)]

"""Running one OpenAI request on the engine: fit checks, adapter lease, batch fan-out, errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

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
    SamplingOptions,
    TokenLogprob,
)
from server.http.auth import Principal
from server.http.errors import ContextLengthExceeded, EngineUnavailable, InvalidRequest, Overloaded
from server.http.observe import RequestRecord
from server.http.tenancy import Tenants

ENGINE_DEAD_MESSAGE = "the inference engine has stopped; retry against another replica"


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
    """A request let in: the adapter it runs through, and how to give back its tenant's slot."""

    entry: AdapterEntry
    release: Callable[[], None]


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
    ):
        self.engine = engine
        self.registry = registry
        self.tenants = tenants
        self.adapter_dir = adapter_dir
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._first_use: dict[str, asyncio.Lock] = {}

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

    def admit(self, entry: AdapterEntry, principal: Principal) -> Admission:
        """Count the request against the gateway's bound (503) and its tenant's limits (429)."""
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(
                f"the gateway is at its limit of {self.max_in_flight} requests in flight; retry shortly",
                headers={"Retry-After": "1"},
            )
        tenant_release = self.tenants.admit(principal.tenant) if self.tenants and principal.tenant else _nothing
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                tenant_release()

        return Admission(entry, release)

    async def _register_from_adapter_dir(self, model: str) -> AdapterEntry | None:
        """Like vLLM's filesystem resolver: a shared adapter from --adapter-dir, on first use."""
        if self.adapter_dir is None or not NAME_PATTERN.match(model) or model == self.registry.base_name:
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

    def check_fits(self, prompt_ids: list[int], max_tokens: int | None, prompt_param: str) -> int:
        """The max_tokens to use; 400 when prompt plus max_tokens exceed the context."""
        limit = self.engine.max_model_len
        if len(prompt_ids) >= limit:
            raise ContextLengthExceeded(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {limit} tokens",
                param=prompt_param,
            )
        room = limit - len(prompt_ids)
        if max_tokens is None:
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
        outcome.choices = [results[i] for i in sorted(results)]
        outcome.usage.completion_tokens = sum(c.token_count for c in outcome.choices)
        return outcome

    async def stream(self, job: Job) -> AsyncIterator[tuple[int, GenerationStep, bool]]:
        """Steps of every prompt as they come: (prompt index, step, whether it ends the job)."""
        unfinished = len(job.prompts)
        async for prompt_index, step in self._steps(job):
            unfinished -= step.finished
            yield prompt_index, step, unfinished == 0

    async def _steps(self, job: Job) -> AsyncIterator[tuple[int, GenerationStep]]:
        try:
            async with self.registry.lease(job.admission.entry) as adapter:
                if len(job.prompts) == 1:
                    steps = _single(self.engine.generate(job.request_id, job.prompts[0], job.options, adapter))
                else:
                    steps = _merge(
                        [
                            self.engine.generate(f"{job.request_id}-{i}", prompt, job.options, adapter)
                            for i, prompt in enumerate(job.prompts)
                        ]
                    )
                async for prompt_index, step in steps:
                    if step.replica is not None:
                        job.record.replica = step.replica
                    job.record.tokens_arrived(sum(choice.token_count for choice in step.choices))
                    if step.finished:
                        job.record.prompt_tokens += step.prompt_tokens
                    yield prompt_index, step
        except EngineDead:
            raise EngineUnavailable(ENGINE_DEAD_MESSAGE) from None
        except EngineRejected as exc:
            raise InvalidRequest(str(exc)) from None
        finally:
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

"""Structured outputs: OpenAI's `response_format`, vLLM's `structured_outputs`, and the check that
a request's grammar holds before anything is generated.

Each form becomes one `OutputConstraint`, which the engine hands to vLLM's xgrammar backend; that
backend compiles the grammar against the tokenizer and caches it. A schema, regex or grammar is
tenant input, so the gateway bounds it (bytes, nesting, choices) and runs the engine's own check
on it first (server/engine/grammar.py), in one thread at a time, under a time bound, with the
verdict cached by text. A bad one is a 400 before the engine sees it, also for a streamed request.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from typing import Annotated, Any, Literal

from fastapi import Depends, Request
from pydantic import ConfigDict, Field, model_validator

from server.engine import grammar
from server.engine.protocol import OutputConstraint
from server.http.bodies import NullMeansAbsent
from server.http.errors import EngineUnavailable, InvalidRequest, Overloaded

MAX_GRAMMAR_BYTES = 64 * 1024  # a schema (as JSON), a regex or a grammar
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays in a schema
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
COMPILE_SECONDS = 5.0
COMPILE_THREADS = 1  # a tenant's slow grammar never takes the threads tokenizers and others need
CACHED_VERDICTS = 1024
SCHEMA_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(NullMeansAbsent):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: OpenAI's named schema."""

    name: Annotated[str, Field(pattern=SCHEMA_NAME)]
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool = False


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: text, any JSON object, or JSON that fits a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` extension, under vLLM's names; exactly one is given."""

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: (
        Annotated[list[Annotated[str, Field(max_length=MAX_CHOICE_CHARS)]], Field(max_length=MAX_CHOICES)] | None
    ) = None
    grammar: str | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [name for name in ("json_schema", "regex", "choice", "grammar", "json_object") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar or json_object (true)")
        return self


def constraint_of(
    response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None
) -> OutputConstraint | None:
    """The one constraint a request asks for, if any; 400 when it asks for two."""
    if response_format is not None and response_format.type != "text" and structured_outputs is not None:
        raise InvalidRequest("give either response_format or structured_outputs, not both", param="structured_outputs")
    if structured_outputs is not None:
        so = structured_outputs
        if so.json_object:
            return OutputConstraint(json_object=True)
        if so.choice:
            return OutputConstraint(choice=tuple(so.choice))
        if so.json_schema is not None:
            return OutputConstraint(json_schema=schema_text(so.json_schema, "structured_outputs.json"))
        return OutputConstraint(regex=so.regex, grammar=so.grammar)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return OutputConstraint(json_object=True)
    spec = response_format.json_schema
    assert spec is not None
    return OutputConstraint(json_schema=schema_text(spec.json_schema, "response_format.json_schema.schema"))


def schema_text(schema: dict[str, Any] | str, param: str) -> str:
    """A schema as compact JSON text (the engine's cache key), within the bounds of bytes and nesting."""
    if isinstance(schema, str):
        _check_bytes(schema, param)
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidRequest("the JSON schema is not valid JSON", param=param) from None
    if not isinstance(schema, dict):
        raise InvalidRequest("a JSON schema must be a JSON object", param=param)
    _check_depth(schema, param)
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    _check_bytes(text, param)
    return text


def _check_bytes(text: str, param: str) -> None:
    size = len(text.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(f"{param} is {size} bytes; this server takes at most {MAX_GRAMMAR_BYTES}", param=param)


def _check_depth(schema: Any, param: str) -> None:
    pending = [(schema, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it", param=param)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


class GrammarChecker:
    """Parses each distinct schema, regex or grammar once, off the event loop, within a time bound."""

    def __init__(self, threads: int = COMPILE_THREADS, seconds: float = COMPILE_SECONDS):
        self._slots = asyncio.Semaphore(threads)
        self._seconds = seconds
        self._verdicts: OrderedDict[OutputConstraint, str | None] = OrderedDict()

    async def check(self, constraint: OutputConstraint | None, param: str) -> None:
        """400 when the constraint is out of bounds or the engine would refuse it; nothing when it is good."""
        if constraint is None or constraint.json_object:
            return
        text = constraint.json_schema or constraint.regex or constraint.grammar or "\n".join(constraint.choice or ())
        _check_bytes(text, param)
        key = constraint
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            verdict = self._verdicts[key]
        else:
            verdict = await self._compile(constraint)
            self._verdicts[key] = verdict
            while len(self._verdicts) > CACHED_VERDICTS:
                self._verdicts.popitem(last=False)
        if verdict is not None:
            raise InvalidRequest(f"this output constraint cannot be enforced: {verdict}", param=param)

    async def _compile(self, constraint: OutputConstraint) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, grammar.load)  # once, untimed: vLLM's import takes seconds
        except Exception as exc:  # noqa: BLE001 - a fault of this server, not of the request
            raise EngineUnavailable(f"the engine's grammar check could not be loaded ({type(exc).__name__})") from None
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that meets the
            # acquire, and the request then runs on for a client that has gone.
            async with asyncio.timeout(self._seconds):
                await self._slots.acquire()
        except TimeoutError:
            raise Overloaded(
                "the gateway is busy checking other requests' grammars; retry shortly", headers={"Retry-After": "1"}
            ) from None
        # The slot is held until the thread ends, also past the time bound, so that slow grammars
        # cannot pile up threads.
        try:
            future = loop.run_in_executor(None, grammar.refusal, constraint)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        try:
            async with asyncio.timeout(self._seconds):
                return await asyncio.shield(future)
        except TimeoutError:  # cached as any verdict: the same text is not tried again
            return f"it took more than {self._seconds:g} s to compile; simplify it"


def grammar_checker(request: Request) -> GrammarChecker:
    """The app's checker, made on first use."""
    state = request.app.state
    checker = getattr(state, "grammar_checker", None)
    if checker is None:
        checker = state.grammar_checker = GrammarChecker()
    return checker


GrammarCheckerDep = Annotated[GrammarChecker, Depends(grammar_checker)]


async def request_constraint(
    request: Request, response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None
) -> OutputConstraint | None:
    """A request's constraint, checked: for the OpenAI routes."""
    constraint = constraint_of(response_format, structured_outputs)
    param = "structured_outputs" if structured_outputs is not None else "response_format"
    await grammar_checker(request).check(constraint, param)
    return constraint

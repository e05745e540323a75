"""Tool calling on chat completions: which mode a request asks for, the grammar a forced call runs
under, and the calls read back out of the generated text, whole or streamed in OpenAI's shape.

- `none`: the tools reach the template, the text comes back as content.
- `auto` (the default when tools are given): the model decides; the gateway's `--tool-call-parser`
  reads its call syntax, as vLLM's server does. Without `--enable-auto-tool-choice`, a 400.
- `required` / a named function: generation is constrained to the tools' JSON schema, so any
  model returns a well-formed call; no parser is involved (vLLM's `get_json_schema_from_tools`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.engine.protocol import OutputConstraint, ToolParsing
from server.http.errors import InvalidRequest
from server.openai.protocol import ChatCompletionRequest, NamedToolChoice

ParserFactory = Callable[[list[dict[str, Any]]], ToolParsing]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(index: int | None, name: str, arguments: str) -> dict[str, Any]:
    call: dict[str, Any] = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index} | call


@dataclass
class ToolUse:
    """How one request uses its tools."""

    mode: str  # none, auto, named, required
    tools: list[dict[str, Any]]  # as the chat template takes them
    name: str | None = None  # the named function
    parallel: bool = True
    parsers: ParserFactory | None = None  # auto: a fresh parser per choice

    @classmethod
    def of(cls, body: ChatCompletionRequest, parsers: ParserFactory | None) -> ToolUse | None:
        """None when the request has no tools; 400 for `auto` on a gateway without a parser."""
        if body.tools is None:
            return None
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        choice = body.tool_choice or "auto"
        parallel = body.parallel_tool_calls is not False
        if isinstance(choice, NamedToolChoice):
            return cls("named", tools, choice.function.name, parallel)
        if choice == "auto" and parsers is None:
            raise InvalidRequest(
                'tool_choice "auto" (the default with tools) needs a tool-call parser, and this gateway runs without '
                '--enable-auto-tool-choice and --tool-call-parser; ask for tool_choice "required" or a named '
                'function, or "none"',
                param="tool_choice",
            )
        return cls(choice, tools, None, parallel, parsers if choice == "auto" else None)

    def constraint(self) -> OutputConstraint | None:
        """The JSON schema a forced call is generated under, as vLLM builds it."""
        functions = {tool["function"]["name"]: tool["function"].get("parameters") for tool in self.tools}
        if self.mode == "named":
            schema = _object_or_empty(functions[self.name])  # type: ignore[index]
        elif self.mode == "required":
            schema = _required_schema(functions, self.parallel)
        else:
            return None
        return OutputConstraint(json_schema=json.dumps(schema, sort_keys=True))

    @property
    def skip_special_tokens(self) -> bool:
        if self.parsers is None:
            return True
        return self.parsers(self.tools).skip_special_tokens

    def message(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole choice's message and finish reason."""
        if self.mode == "named":
            calls = [_call(None, self.name, text)]  # type: ignore[arg-type]
            content = None
        elif self.mode == "required":
            content, calls = _required_calls(text)
        elif self.mode == "auto":
            parsed = self.parsers(self.tools).extract(text)  # type: ignore[misc]
            content, calls = parsed.content, [_call(None, name, arguments) for name, arguments in parsed.calls]
        else:
            content, calls = text, []
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, _called(finish_reason)

    def streamer(self) -> StreamedCalls:
        return StreamedCalls(self, self.parsers(self.tools) if self.parsers else None)


def _called(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _object_or_empty(parameters: dict[str, Any] | None) -> dict[str, Any]:
    return parameters if parameters else {"type": "object", "properties": {}}


def _required_schema(functions: dict[str, dict[str, Any] | None], parallel: bool) -> dict[str, Any]:
    definitions: dict[str, Any] = {}
    alternatives = []
    for name, parameters in functions.items():
        parameters = dict(_object_or_empty(parameters))
        for key, value in parameters.pop("$defs", {}).items():
            if definitions.setdefault(key, value) != value:
                raise InvalidRequest(
                    f"tools define $defs.{key} twice, differently; give each a name of its own", param="tools"
                )
        alternatives.append(
            {
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": alternatives}}
    if not parallel:
        schema["maxItems"] = 1
    if definitions:
        schema["$defs"] = definitions
    return schema


def _required_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A `required` choice's calls: the JSON array the grammar allowed (cut short: no calls, the text)."""
    try:
        items = json.loads(text)
        calls = [_call(None, item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items]
    except (ValueError, TypeError, KeyError):
        return text, []
    return None, calls


@dataclass
class StreamedCalls:
    """One streamed choice: each step's text in, OpenAI's deltas (content or tool_calls) out."""

    use: ToolUse
    parser: ToolParsing | None
    text: str = ""
    called: bool = False
    _opened: bool = False
    _deltas: list[dict[str, Any]] = field(default_factory=list)

    def step(self, text: str, token_ids: list[int]) -> list[dict[str, Any]]:
        """The deltas this step's text makes (none while a call is still being read)."""
        self.text += text
        mode = self.use.mode
        if mode == "named":
            if not self._opened:
                self._opened = self.called = True
                return [{"tool_calls": [_call(0, self.use.name, text)]}]  # type: ignore[arg-type]
            return [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}] if text else []
        if mode == "required":
            return []  # one array: sent whole at the end, once it parses
        if mode == "auto":
            content, deltas = self.parser.extract_delta(text, token_ids)  # type: ignore[union-attr]
            out: list[dict[str, Any]] = [{"content": content}] if content else []
            for delta in deltas:
                if delta.name is not None:
                    self.called = True
                    opening = _call(delta.index, delta.name, delta.arguments or "")
                    if delta.id:
                        opening["id"] = delta.id
                    out.append({"tool_calls": [opening]})
                elif delta.arguments:
                    out.append({"tool_calls": [{"index": delta.index, "function": {"arguments": delta.arguments}}]})
            return out
        return [{"content": text}] if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The deltas the end releases, and the finish reason to report."""
        out: list[dict[str, Any]] = []
        if self.use.mode == "required":
            content, calls = _required_calls(self.text)
            if calls:
                self.called = True
                for index, call in enumerate(calls):
                    arguments = call["function"]["arguments"]
                    out.append({"tool_calls": [_call(index, call["function"]["name"], "")]})
                    out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})
            elif content:
                out.append({"content": content})
        elif self.use.mode == "auto" and self.called:
            index, rest = self.parser.unstreamed_arguments()  # type: ignore[union-attr]
            if rest:
                out.append({"tool_calls": [{"index": index, "function": {"arguments": rest}}]})
        return out, _called(finish_reason) if self.called else finish_reason

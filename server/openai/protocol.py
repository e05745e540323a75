"""OpenAI request models. Responses are built as plain dicts in the routes and serialised by orjson.

Unknown parameters are refused (400 `unsupported_parameter`), never dropped, except that an
explicit `null` means "not given", on every field, as the OpenAI API and vLLM treat it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.http.bodies import NullMeansAbsent
from server.http.errors import InvalidRequest
from server.openai.extras import ExtraFields
from server.openai.structured import ResponseFormat, StructuredOutputs

MAX_N = 16
MAX_STOP = 4
MAX_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
MAX_NAME_CHARS = 256  # model and adapter names; the catalog's are far shorter
MAX_TOOLS = 128  # as OpenAI's API
MAX_TOOLS_BYTES = 64 * 1024  # the tools' definitions, as JSON: each forced call compiles them into a grammar
MAX_SCHEMA_DEPTH = 16  # nesting of a tool's parameters schema
INT64 = (-(2**63), 2**63 - 1)  # seeds, as vLLM's server bounds them (torch.long)
GREEDY_BELOW = 1e-5  # vLLM decodes greedily below this temperature, and then refuses n > 1

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Field(ge=1)]
NonEmptyText = Annotated[str, Field(min_length=1)]
ModelName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS)]


class _Request(NullMeansAbsent):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request, ExtraFields):
    model: ModelName
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[NonEmptyText] | None = Field(None)
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM's extensions, accepted so that load tools written for vLLM's server work unchanged.
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    return_token_ids: bool = False
    response_format: ResponseFormat | None = None  # server/openai/structured.py
    structured_outputs: StructuredOutputs | None = None  # vLLM's name

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if isinstance(stop, str) and not stop:
            raise ValueError("a stop sequence must not be empty")
        return stop

    @field_validator("seed")
    @classmethod
    def _seed_is_int64(cls, seed: int | None) -> int | None:
        if seed is not None and not INT64[0] <= seed <= INT64[1]:
            raise ValueError(f"seed must be a 64-bit signed integer, from {INT64[0]} to {INT64[1]}")
        return seed

    @model_validator(mode="after")
    def _engine_can_honour(self) -> Any:
        max_tokens = self.requested_max_tokens
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise InvalidRequest(
                f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens}); lower min_tokens",
                param="min_tokens",
            )
        if self.n > 1 and self.temperature < GREEDY_BELOW:
            raise InvalidRequest(
                f"n is {self.n} with temperature {self.temperature:g}, which decodes greedily: every choice would "
                "be the same; raise temperature above 0, or ask for n 1",
                param="n",
            )
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: (
        NonEmptyText
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    )
    echo: bool = False  # the prompt comes back before the completion, with its logprobs if asked
    max_tokens: int = Field(16, ge=0)  # 0 only with echo: the prompt and its logprobs, no completion
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_to_echo(cls, max_tokens: int, info: ValidationInfo) -> int:
        if max_tokens == 0 and not info.data.get("echo"):
            raise ValueError("0 is only for echo, which returns the prompt; ask for 1 or more tokens")
        return max_tokens

    @property
    def requested_max_tokens(self) -> int:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: strings to encode, or token ids as given."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class TextPart(_Request):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(_Request):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Request):
    """A function the model may call (`tools`)."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: FunctionName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(_Request):
    name: FunctionName
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Request):
    """A call an assistant message made, as a client sends the history back."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=64)
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required, except in an assistant message with tool_calls")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls belong in assistant messages, not in a {self.role} message")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, the id of the call it answers; others have none")
        return self

    def as_template_input(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content}
        if self.name is not None:
            message["name"] = self.name  # the template gets it, as vLLM passes it; it may use it or not
        if self.tool_calls:
            # Templates take arguments as objects, as transformers and vLLM hand them over.
            message["tool_calls"] = [
                {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}
                for call, arguments in zip(self.tool_calls, _call_arguments(self.tool_calls), strict=True)
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _call_arguments(calls: list[ToolCall]) -> list[Any]:
    try:
        return [json.loads(call.function.arguments) for call in calls]
    except ValueError:
        raise InvalidRequest(
            "the arguments of an assistant's tool call must be JSON text, as the model returned them",
            param="messages",
        ) from None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Annotated[list[ToolDefinition], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tools_are_usable(self) -> ChatCompletionRequest:
        if self.tools is None:
            if self.tool_choice not in (None, "none"):
                raise InvalidRequest(
                    "tool_choice needs tools: list the functions the model may call", param="tool_choice"
                )
            return self
        size = len(json.dumps([tool.function.model_dump(exclude_none=True) for tool in self.tools]))
        if size > MAX_TOOLS_BYTES:
            raise InvalidRequest(
                f"the tools take {size} bytes as JSON; at most {MAX_TOOLS_BYTES} are accepted", param="tools"
            )
        names = [tool.function.name for tool in self.tools]
        if len(set(names)) != len(names):
            raise InvalidRequest("each tool needs a name of its own", param="tools")
        for tool in self.tools:
            if _depth(tool.function.parameters) > MAX_SCHEMA_DEPTH:
                raise InvalidRequest(
                    f"the parameters of tool {tool.function.name} nest deeper than {MAX_SCHEMA_DEPTH} levels",
                    param="tools",
                )
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise InvalidRequest(
                f"tool_choice names {self.tool_choice.function.name}, which is not in tools ({', '.join(names)})",
                param="tool_choice",
            )
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("requires logprobs to be true")
        return top

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0

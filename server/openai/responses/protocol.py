"""The Responses API's request (`POST /v1/responses`) and its translation into a chat request.

A Responses request is run as the chat request it amounts to: its input items become chat
messages (a `function_call` an assistant's tool call, a `function_call_output` a tool message),
its flat function tools chat's tools, `text.format` chat's `response_format`. What the gateway
cannot do (hosted tools, background runs, reasoning, images and files) is refused with a 400 that
names the parameter, never dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.http.bodies import Metadata, NullMeansAbsent
from server.http.errors import InvalidRequest, _validation_error
from server.openai.protocol import MAX_TOOLS, FunctionName, ModelName, Temperature, TopP
from server.openai.structured import SCHEMA_NAME

MAX_INPUT_ITEMS = 2048
MAX_ID_CHARS = 256
HOSTED_TOOLS = (
    "web_search",
    "web_search_preview",
    "file_search",
    "computer_use_preview",
    "computer",
    "code_interpreter",
    "mcp",
    "image_generation",
    "local_shell",
    "shell",
    "custom",
    "apply_patch",
)


class _Model(NullMeansAbsent):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Item(NullMeansAbsent):
    """An input item: clients send back the items a response gave them, with their ids and status."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class TextContent(_Model):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # output_text, as a response gave it: sent back, not read
    logprobs: list[Any] | None = None


class RefusalContent(_Model):
    type: Literal["refusal"]
    refusal: str


Content = Annotated[TextContent | RefusalContent, Field(discriminator="type")]


class MessageItem(_Item):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Content]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text if isinstance(part, TextContent) else part.refusal for part in self.content)


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
    name: FunctionName
    arguments: str


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
    output: str | list[TextContent]

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]


class FunctionTool(_Model):
    """Responses' function tool: flat, with the name beside the type."""

    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat_tool(self) -> dict[str, Any]:
        function = self.model_dump(exclude_none=True, exclude={"type"})
        return {"type": "function", "function": function}


class FunctionChoice(_Model):
    type: Literal["function"]
    name: FunctionName


class TextFormat(_Model):
    """`text.format`: plain text, any JSON object, or JSON that fits a named schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(pattern=SCHEMA_NAME)] | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.json_schema is None):
            raise InvalidRequest("text.format of type json_schema needs a name and a schema", param="text.format")
        return self

    def as_response_format(self) -> dict[str, Any]:
        if self.type != "json_schema":
            return {"type": self.type}
        spec = {"name": self.name, "schema": self.json_schema, "description": self.description, "strict": self.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}

    def echo(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, by_alias=True)


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only one a model without a verbosity setting has


class ResponsesRequest(_Model):
    """POST /v1/responses."""

    model: ModelName
    input: str | Annotated[list[InputItem], Field(max_length=MAX_INPUT_ITEMS)] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    text: TextConfig | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    metadata: Metadata = None
    stream: bool = False
    store: bool = True
    previous_response_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None  # a hint: accepted, no effect
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    truncation: Literal["disabled"] | None = None  # "auto" would drop input silently: not offered
    background: bool = False
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _items_each_checked(cls, value: Any) -> Any:
        """Each item checked on its own, so that a refusal names the item and says what it should be."""
        if not isinstance(value, list):
            return value
        for index, item in enumerate(value[:MAX_INPUT_ITEMS]):
            check_item(item, f"input[{index}]")
        return [_typed(item) for item in value]

    @field_validator("tools")
    @classmethod
    def _function_tools_only(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for index, tool in enumerate(tools or ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                hosted = kind in HOSTED_TOOLS or (isinstance(kind, str) and kind.startswith(HOSTED_TOOLS))
                what = f"the hosted tool '{str(kind)[:64]}'" if hosted else f"a tool of type '{str(kind)[:64]}'"
                raise InvalidRequest(
                    f"{what} is not available on this server: it runs function tools only "
                    '({"type": "function", "name", "parameters"}), which the caller executes',
                    param=f"tools[{index}].type",
                )
        return tools

    @field_validator("background")
    @classmethod
    def _no_background(cls, background: bool) -> bool:
        if background:
            raise InvalidRequest(
                "background responses are not offered; leave background out, or use the Batch API "
                "(/v1/batches with endpoint /v1/responses) for work that can wait",
                param="background",
            )
        return background

    @field_validator("reasoning")
    @classmethod
    def _no_reasoning(cls, reasoning: dict[str, Any] | None) -> dict[str, Any] | None:
        if reasoning and any(value is not None for value in reasoning.values()):
            raise InvalidRequest(
                "reasoning settings are not supported: the models served here have no reasoning effort or "
                "summaries; leave reasoning out",
                param="reasoning",
            )
        return None

    @field_validator("include")
    @classmethod
    def _nothing_to_include(cls, include: list[str] | None) -> list[str] | None:
        if include:
            raise InvalidRequest(
                f"include '{include[0][:64]}' is not available: it asks for hosted tools' results, reasoning or "
                "logprobs, which this server does not produce; send include [] or leave it out",
                param="include",
            )
        return include

    @property
    def n(self) -> int:
        """One output per request (the Batch API counts sequences with it)."""
        return 1

    def function_tools(self) -> list[FunctionTool]:
        try:
            return [FunctionTool.model_validate(tool) for tool in self.tools or ()]
        except ValidationError as exc:
            error = _validation_error(exc)
            raise InvalidRequest(error.message, param=f"tools.{error.param}" if error.param else "tools") from None

    def input_items(self) -> list[dict[str, Any]]:
        """The input as items (a string is one user message), as the input_items route lists them."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": self.input}]}]
        items = []
        for item in self.input:
            raw = item.model_dump(exclude_none=True)
            if isinstance(item, MessageItem) and isinstance(item.content, str):
                kind = "output_text" if item.role == "assistant" else "input_text"
                raw["content"] = [{"type": kind, "text": item.content}]
            items.append(raw)
        return items

    def echo(self) -> dict[str, Any]:
        """The request's settings, as a Response object repeats them."""
        choice = self.tool_choice or "auto"
        text_format = self.text.format if self.text is not None and self.text.format is not None else None
        return {
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata or {},
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "store": self.store,
            "temperature": self.temperature,
            "text": {"format": text_format.echo() if text_format else {"type": "text"}},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [tool.model_dump(exclude_none=True) for tool in self.function_tools()],
            "top_p": self.top_p,
            "truncation": "disabled",
            "user": self.user,
        }


def check_item(raw: Any, param: str) -> MessageItem | FunctionCallItem | FunctionCallOutputItem:
    """One input item, or a 400 naming it: text messages, function calls and their outputs only."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    parts = raw.get("content") if isinstance(raw, dict) and isinstance(raw.get("content"), list) else []
    media = [p.get("type") for p in parts if isinstance(p, dict) and p.get("type") in ("input_image", "input_file")]
    if kind in ("input_image", "input_file") or media:
        raise InvalidRequest(
            f"{kind or media[0]} is not supported: the models served here read text only; send input_text parts",
            param=param,
        )
    try:
        return _ITEM.validate_python(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error.get("loc", ())[2:])
        if error.get("type") in ("union_tag_invalid", "union_tag_not_found", "model_attributes_type"):
            message = (
                "an input item is a message (role and content), a function_call or a function_call_output; "
                f"got type '{str(kind)[:64]}'"
            )
        else:
            detail = error.get("msg", "invalid value").removeprefix("Value error, ")
            message = f"invalid value for '{param}{'.' + where if where else ''}': {detail}"
        raise InvalidRequest(message, param=param) from None


def _typed(item: Any) -> Any:
    """An item without a type but with a role is a message, as OpenAI reads it."""
    if isinstance(item, dict) and "type" not in item and "role" in item:
        return {"type": "message", **item}
    return item


class _Items(BaseModel):
    item: InputItem


class _ItemAdapter:
    """Validates one stored or sent item (a message without a type is a message)."""

    def validate_python(self, raw: dict[str, Any]) -> MessageItem | FunctionCallItem | FunctionCallOutputItem:
        return _Items.model_validate({"item": _typed(raw)}).item


_ITEM = _ItemAdapter()

"""A Responses request as the chat request it amounts to, and chat's errors in Responses' words.

Input items become chat messages: a message its role and text, a `function_call` an assistant
message's tool call (consecutive calls, and a call after an assistant's text, join that message,
as a chat client sends them), a `function_call_output` a tool message. `instructions` is the
system message before them all.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from server.http.errors import InvalidRequest, _validation_error
from server.openai.protocol import ChatCompletionRequest
from server.openai.responses.protocol import (
    FunctionCallItem,
    FunctionChoice,
    MessageItem,
    ResponsesRequest,
    check_item,
)

# Chat's parameter names, as a Responses caller knows them.
CHAT_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.json_schema.schema": "text.format.schema",
}


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses items as chat messages: consecutive function calls join the assistant message before them."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for index, raw in enumerate(items):
        item = check_item(raw, f"input[{index}]")
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                if not last.get("content"):
                    last["content"] = None
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
    return messages


def chat_request(body: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat request `body` amounts to, with `items` (earlier turns, then its own input) as its messages."""
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": chat_messages(body.instructions, items),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_completion_tokens": body.max_output_tokens,
        "user": body.user,
        "stream": body.stream,
    }
    if body.tools:
        chat["tools"] = [tool.as_chat_tool() for tool in body.function_tools()]
        chat["parallel_tool_calls"] = body.parallel_tool_calls
    choice = body.tool_choice
    if isinstance(choice, FunctionChoice):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None and (body.tools or choice != "none"):
        chat["tool_choice"] = choice
    if body.text is not None and body.text.format is not None:
        chat["response_format"] = body.text.format.as_response_format()
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        raise as_responses_error(_validation_error(exc)) from None
    except InvalidRequest as exc:
        raise as_responses_error(exc) from None


def as_responses_error(error: InvalidRequest) -> InvalidRequest:
    """A chat error with the parameter a Responses caller sent: `input` for `messages`, and so on."""
    if error.param is not None:
        head = error.param.split(".")[0]
        error.param = CHAT_PARAMS.get(error.param) or ("input" if head == "messages" else CHAT_PARAMS.get(head, head))
    error.message = error.message.replace("max_completion_tokens", "max_output_tokens").replace(
        "max_tokens", "max_output_tokens"
    )
    return error

"""A Responses request's run and its output: the Response object, its items, its usage."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from server.http.auth import Principal
from server.http.errors import GatewayError, as_gateway_error
from server.openai.generation import Job, Usage
from server.openai.responses.protocol import ResponsesRequest
from server.openai.responses.store import Reservation, ResponseStore
from server.openai.tools import ToolUse


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponseRun:
    """One Responses request on its way: its job, what it started from, and where it is kept."""

    body: ResponsesRequest
    response_id: str
    created_at: int
    input_items: list[dict[str, Any]]
    context: list[dict[str, Any]]
    job: Job
    tool_use: ToolUse | None
    principal: Principal
    store: ResponseStore
    reservation: Reservation | None  # None: not stored

    def __post_init__(self) -> None:
        self._echo = self.body.echo()  # the request's settings, repeated in every Response object

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: Usage | None = None,
        incomplete: str | None = None,
        error: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """OpenAI's Response object."""
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "model": self.body.model,
            "output": output,
            "reasoning": None,
            "usage": usage_object(usage) if usage is not None else None,
            **self._echo,
        }

    async def keep(self, response: dict[str, Any]) -> None:
        """Store the finished response, when the request asked to (`store`, OpenAI's default)."""
        if self.reservation is not None:
            await self.store.save(self.principal, response, self.input_items, self.context, self.reservation.limit)

    def release(self) -> None:
        if self.reservation is not None:
            self.reservation.release()


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def message_item(text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {
        "id": item_id or new_id("msg"),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [text_part(text)],
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {
        "id": item_id or new_id("fc"),
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def ending(finish_reason: str | None) -> tuple[str, str | None]:
    """The response's status, and why it is incomplete: max_output_tokens cut it."""
    return ("incomplete", "max_output_tokens") if finish_reason == "length" else ("completed", None)


def output_items(tool_use: ToolUse | None, text: str, finish_reason: str | None) -> list[dict[str, Any]]:
    """A finished choice as output items: its text as a message, each tool call as a function_call."""
    status, _ = ending(finish_reason)
    if tool_use is None:
        return [message_item(text, status)]
    message, _ = tool_use.message(text, finish_reason)
    calls = message.get("tool_calls") or []
    items = [message_item(message["content"], status)] if message.get("content") or not calls else []
    for call in calls:
        function = call["function"]
        items.append(call_item(call["id"], function["name"], function["arguments"], "completed"))
    return items


def with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as they are kept and listed: each with an id (kept when the caller gave one)."""
    prefixes = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
    return [item if "id" in item else {"id": new_id(prefixes[item["type"]]), **item} for item in items]


def failure(exc: BaseException) -> dict[str, str]:
    """A Response object's `error` for a failure after the stream began."""
    if isinstance(exc, GatewayError) or hasattr(exc, "message"):
        error = as_gateway_error(exc)  # type: ignore[arg-type]
        code = "rate_limit_exceeded" if error.status_code == 429 else "server_error"
        return {"code": code, "message": error.message}
    return {"code": "server_error", "message": "internal server error"}

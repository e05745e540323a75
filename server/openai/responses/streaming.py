"""A streamed response: OpenAI's event sequence, each event with its `sequence_number`.

`response.created` and `response.in_progress` open it. Text comes as a `message` item
(`response.output_item.added`, `response.content_part.added`, `response.output_text.delta`...,
`.done`, `response.content_part.done`, `response.output_item.done`); each tool call as a
`function_call` item with `response.function_call_arguments.delta`s and `.done`. It ends with
`response.completed` (or `response.incomplete`, when max_output_tokens cut it), which carries the
whole response, stored by then. A failure after the start ends it with `response.failed`.

The deltas are the chat route's (server/openai/tools.py's streamer reads the calls out of the
text), so a streamed response says what a streamed chat completion says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from adapters.errors import AdapterError
from server.http.errors import GatewayError
from server.http.responses import DONE
from server.openai.generation import Generator, Usage
from server.openai.responses.output import ResponseRun, call_item, ending, failure, message_item, new_id, text_part


class OutputEvents:
    """Chat deltas in, Responses events out; keeps the output items as they grow."""

    def __init__(self) -> None:
        self.sequence = 0
        self.items: list[dict[str, Any]] = []
        self._message: dict[str, Any] | None = None  # the message item open now
        self._text = ""
        self._calls: dict[int, dict[str, Any]] = {}  # open function_call items by the chat call index

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def chat_delta(self, delta: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.text(delta["content"]) if delta.get("content") else []
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if "name" in function:
                events += self.open_call(call["index"], call["id"], function["name"], function.get("arguments") or "")
            elif function.get("arguments"):
                events += self.call_arguments(call["index"], function["arguments"])
        return events

    def text(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self._message is None:
            events += self._open_message()
        self._text += delta
        index = len(self.items) - 1
        events.append(
            self.event(
                "response.output_text.delta",
                item_id=self._message["id"],  # type: ignore[index]
                output_index=index,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return events

    def _open_message(self) -> list[dict[str, Any]]:
        self._message = {**message_item("", "in_progress"), "content": []}
        self._text = ""
        self.items.append(self._message)
        index = len(self.items) - 1
        return [
            self.event("response.output_item.added", output_index=index, item=dict(self._message)),
            self.event(
                "response.content_part.added",
                item_id=self._message["id"],
                output_index=index,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []},
            ),
        ]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        message, self._message = self._message, None
        if message is None:
            return []
        index = self.items.index(message)
        done = message_item(self._text, status, message["id"])
        self.items[index] = done
        part = text_part(self._text)
        return [
            self.event(
                "response.output_text.done",
                item_id=done["id"],
                output_index=index,
                content_index=0,
                text=self._text,
                logprobs=[],
            ),
            self.event(
                "response.content_part.done", item_id=done["id"], output_index=index, content_index=0, part=part
            ),
            self.event("response.output_item.done", output_index=index, item=done),
        ]

    def open_call(self, chat_index: int, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
        events = self._close_message("completed")
        item = call_item(call_id, name, "", "in_progress", new_id("fc"))
        self.items.append(item)
        self._calls[chat_index] = item
        events.append(self.event("response.output_item.added", output_index=len(self.items) - 1, item=dict(item)))
        if arguments:
            events += self.call_arguments(chat_index, arguments)
        return events

    def call_arguments(self, chat_index: int, delta: str) -> list[dict[str, Any]]:
        item = self._calls[chat_index]
        item["arguments"] += delta
        index = self.items.index(item)
        return [
            self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=delta)
        ]

    def close(self, status: str) -> list[dict[str, Any]]:
        """Close every open item; an answer with neither text nor calls is one empty message."""
        if not self.items:
            events = self._open_message()
            return events + self._close_message(status)
        events = self._close_message(status)
        for item in self._calls.values():
            index = self.items.index(item)
            item["status"] = "completed"
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            events.append(self.event("response.output_item.done", output_index=index, item=dict(item)))
        self._calls = {}
        return events


async def events(run: ResponseRun, generator: Generator) -> AsyncIterator[list[Any]]:
    """The stream, a batch of events per engine step; the last batch ends in DONE."""
    out = OutputEvents()
    started = run.response("in_progress", [])
    batch: list[Any] = [
        out.event("response.created", response=started),
        out.event("response.in_progress", response=started),
    ]
    usage = Usage()
    finish_reason = None
    streamer = run.tool_use.streamer() if run.tool_use is not None else None
    try:
        async for _, step, _last in generator.stream(run.job):
            for delta in step.choices:
                usage.completion_tokens += delta.token_count
                if streamer is not None:
                    deltas = streamer.step(delta.text, delta.token_ids)
                else:
                    deltas = [{"content": delta.text}] if delta.text else []
                if delta.finish_reason is not None:
                    finish_reason = delta.finish_reason
                    if streamer is not None:
                        deltas = [*deltas, *streamer.finish(delta.finish_reason)[0]]
                for chat_delta in deltas:
                    batch += out.chat_delta(chat_delta)
            if step.finished:
                usage.prompt_tokens += step.prompt_tokens
            if batch:
                yield batch
                batch = []
        status, incomplete = ending(finish_reason)
        batch += out.close(status)
        response = run.response(status, out.items, usage, incomplete)
        await run.keep(response)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        yield [*batch, out.event(kind, response=response), DONE]
    except (GatewayError, AdapterError) as exc:
        failed = run.response("failed", out.items, usage, error=failure(exc))
        yield [*batch, out.event("response.failed", response=failed), DONE]

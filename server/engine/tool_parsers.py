"""vLLM's tool-call parsers (`--tool-call-parser`), behind types that do not mention vLLM.

A parser reads the model's own call syntax (Hermes' `<tool_call>` JSON, Llama 3's JSON, ...) out of
its text, whole or delta by delta, as vLLM's server does for `tool_choice: "auto"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.engine.protocol import ParsedCalls, ToolCallDelta


def parser_names() -> list[str]:
    from vllm.tool_parsers import ToolParserManager

    return sorted(ToolParserManager.list_registered())


def check_parser_name(name: str) -> None:
    """ValueError naming the known parsers, for a --tool-call-parser vLLM does not have."""
    names = parser_names()
    if name not in names:
        raise ValueError(f"--tool-call-parser {name!r} is not one of vLLM's tool parsers: {', '.join(names)}")


class ToolCallParser:
    """One choice's parser: each choice of a request gets its own, since streaming keeps state."""

    def __init__(self, name: str, tokenizer: Any, tools: list[dict[str, Any]]):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers import ToolParserManager

        # The parsers read the request's tools (and set skip_special_tokens on it) in vLLM's own type.
        request = ChatCompletionRequest(
            model="-", messages=[{"role": "user", "content": ""}], tools=tools, tool_choice="auto"
        )
        self._parser = ToolParserManager.get_tool_parser(name)(tokenizer, request.tools)
        self._request = self._parser.adjust_request(request)
        self.skip_special_tokens = bool(self._request.skip_special_tokens)
        self._text = ""
        self._token_ids: list[int] = []

    def extract(self, text: str) -> ParsedCalls:
        """The calls in a whole response, and the text besides them."""
        info = self._parser.extract_tool_calls(text, self._request)
        if not info.tools_called:
            return ParsedCalls(content=text, calls=[])
        return ParsedCalls(
            content=info.content,
            calls=[(call.function.name, call.function.arguments) for call in info.tool_calls],
        )

    def extract_delta(self, delta_text: str, delta_token_ids: Sequence[int]) -> tuple[str | None, list[ToolCallDelta]]:
        """The content and call deltas that this step's text completes (either may be empty)."""
        previous_text, previous_ids = self._text, self._token_ids
        self._text = previous_text + delta_text
        self._token_ids = [*previous_ids, *delta_token_ids]
        message = self._parser.extract_tool_calls_streaming(
            previous_text,
            self._text,
            delta_text,
            previous_ids,
            self._token_ids,
            list(delta_token_ids),
            self._request,
        )
        if message is None:
            return None, []
        deltas = [
            ToolCallDelta(call.index, call.id, _field(call.function, "name"), _field(call.function, "arguments"))
            for call in message.tool_calls
        ]
        return message.content, deltas

    def unstreamed_arguments(self) -> tuple[int, str]:
        """The last call's index and the arguments read but not yet streamed, when the generation ends."""
        return max(0, len(self._parser.prev_tool_call_arr) - 1), self._parser.get_remaining_unstreamed_args()


def _field(function: Any, name: str) -> str | None:
    if isinstance(function, dict):
        return function.get(name)
    return getattr(function, name, None)

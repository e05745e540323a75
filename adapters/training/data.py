"""Fine-tuning data files: JSONL in OpenAI's chat or prompt/completion format, checked and tokenized.

A file holds one format. Chat lines are `{"messages": [{"role", "content", "weight"?}, ...]}` and
are learnt on their assistant turns only, rendered through the base model's chat template, so
that training sees exactly the tokens serving will. Tool use takes OpenAI's format: `"tools"` on
the line (rendered by the template, as at serving), assistant turns with `"tool_calls"` (learnt,
calls included) and `"tool"` messages with their `"tool_call_id"`. Prompt/completion lines are
`{"prompt", "completion"}` and are learnt on the completion. Either way the end-of-sequence token
that follows the answer is learnt too: that is how the tuned model knows to stop.

A file is read as a stream, one line at a time, each line at most `max_line_bytes` long and its
nesting bounded before json parses it: validating holds one line in memory, never the file.
"""

from __future__ import annotations

import codecs
import functools
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from adapters.errors import InvalidTrainingFile
from adapters.limits import MAX_JSON_DEPTH, json_depth

CHAT = "chat"
PROMPT_COMPLETION = "prompt_completion"
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips

_FORMAT_NAMES = {CHAT: "chat", PROMPT_COMPLETION: "prompt/completion"}
_MESSAGE_KEYS = {"role", "content", "weight", "name", "tool_calls", "tool_call_id"}
_CHAT_KEYS = {"messages", "tools", "parallel_tool_calls"}
_UNSUPPORTED_CHAT_KEYS = {"functions"}
_TOOL_CALL_EXAMPLE = '{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}'
_MAX_ECHOED = 40
# An example's text is a few KiB, and the longest context this gateway trains on is far below this.
MAX_LINE_BYTES = 1024 * 1024

Format = Literal["chat", "prompt_completion"]


@dataclass(frozen=True)
class DatasetSummary:
    """What a valid training file holds."""

    format: Format
    examples: int
    assistant_messages: int  # messages learnt from (chat), or completions
    characters: int  # of all text content: a rough size before tokenizing


@dataclass(frozen=True)
class TokenizedExample:
    """One example as token ids, with IGNORE_INDEX in `labels` wherever nothing is learnt."""

    line: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def learnt_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class _Record:
    line: int
    format: Format
    value: dict[str, Any]


def validate_training_file(
    source: bytes | BinaryIO, *, max_examples: int | None = None, max_line_bytes: int = MAX_LINE_BYTES
) -> DatasetSummary:
    """Check a JSONL training file (its bytes, or a binary stream read line by line); raise
    InvalidTrainingFile naming the first bad line."""
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    examples = learnt = characters = 0
    first_format: Format = CHAT
    for record in _records(stream, max_examples, max_line_bytes):
        if not examples:
            first_format = record.format
        examples += 1
        if record.format == CHAT:
            messages = record.value["messages"]
            learnt += sum(_is_learnt(message) for message in messages)
            characters += sum(len(message.get("content") or "") for message in messages)
        else:
            learnt += 1
            characters += len(record.value["prompt"]) + len(record.value["completion"])
    return DatasetSummary(format=first_format, examples=examples, assistant_messages=learnt, characters=characters)


def load_examples(
    path: Path,
    tokenizer: Any,
    max_length: int,
    *,
    warn: Callable[[str], None] | None = None,
) -> list[TokenizedExample]:
    """Tokenize a training file for `tokenizer`'s model, examples cut to `max_length` tokens.

    An example with nothing left to learn after the cut is dropped and reported through `warn`;
    if none is left, InvalidTrainingFile says so.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    examples: list[TokenizedExample] = []
    dropped: list[int] = []
    with open(path, "rb") as stream:
        for record in _records(stream, None, MAX_LINE_BYTES):
            if record.format == CHAT:
                input_ids, labels = _tokenize_chat(record, tokenizer)
            else:
                input_ids, labels = _tokenize_prompt_completion(record, tokenizer)
            truncated = len(input_ids) > max_length
            example = TokenizedExample(record.line, input_ids[:max_length], labels[:max_length], truncated)
            if example.learnt_tokens == 0:
                dropped.append(record.line)
            else:
                examples.append(example)
    if dropped and warn is not None:
        shown = ", ".join(map(str, dropped[:10])) + (" ..." if len(dropped) > 10 else "")
        warn(
            f"{len(dropped)} example(s) skipped: nothing to learn within the first {max_length} tokens "
            f"({'line' if len(dropped) == 1 else 'lines'} {shown}); shorten them or raise max_length"
        )
    if not examples:
        raise InvalidTrainingFile(
            f"no example has anything to learn within its first {max_length} tokens; "
            "shorten the prompts or raise max_length"
        )
    return examples


# -- parsing --------------------------------------------------------------------------------------


def _records(stream: BinaryIO, max_examples: int | None, max_line_bytes: int) -> Iterator[_Record]:
    """The file's examples, one line read at a time; blank lines, a trailing one among them, are skipped."""
    first: _Record | None = None
    count = 0
    for line_number, raw in enumerate(_lines(stream, max_line_bytes), start=1):
        if line_number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)
        if not raw.strip():
            continue
        record = _parse_line(line_number, raw)
        if first is None:
            first = record
        elif record.format != first.format:
            raise InvalidTrainingFile(
                f"line {line_number} is {_FORMAT_NAMES[record.format]} but line {first.line} is "
                f"{_FORMAT_NAMES[first.format]}; use one format per file"
            )
        count += 1
        if max_examples is not None and count > max_examples:
            raise InvalidTrainingFile(f"the file has more than {max_examples} examples; the limit is {max_examples}")
        yield record
    if first is None:
        raise InvalidTrainingFile(
            'the file is empty; give one JSON object per line, {"messages": [...]} or {"prompt": ..., "completion": ...}'
        )


def _lines(stream: BinaryIO, max_line_bytes: int) -> Iterator[bytes]:
    """Each line without its line ending; readline is asked for no more than one byte past the cap."""
    line_number = 0
    while raw := stream.readline(max_line_bytes + 2):  # the cap, then "\r\n"
        line_number += 1
        line = raw.removesuffix(b"\n").removesuffix(b"\r")
        if len(line) > max_line_bytes:
            raise InvalidTrainingFile(
                f"line {line_number} is over {max_line_bytes} bytes; each example must fit in {max_line_bytes} bytes "
                "(shorten it or split it into several examples)"
            )
        yield line


def _parse_line(line_number: int, raw: bytes) -> _Record:
    where = f"line {line_number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidTrainingFile(f"{where} is not UTF-8 text; save the file as UTF-8") from None
    if (depth := json_depth(raw)) > MAX_JSON_DEPTH:
        raise InvalidTrainingFile(
            f"{where} is nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted "
            '(an example nests 3: {"messages": [{"role", "content"}]})'
        )
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidTrainingFile(
            f"{where} is not JSON: {exc.msg} at column {exc.colno}; each line must be one JSON object"
        ) from None
    except RecursionError:
        raise InvalidTrainingFile(f"{where} is nested too deeply") from None
    if not isinstance(value, dict):
        raise InvalidTrainingFile(f"{where} is a JSON {_json_type(value)}; each line must be one JSON object")
    if "messages" in value:
        _check_chat(where, value)
        return _Record(line_number, CHAT, value)
    if "prompt" in value or "completion" in value:
        _check_prompt_completion(where, value)
        return _Record(line_number, PROMPT_COMPLETION, value)
    raise InvalidTrainingFile(
        f'{where} has neither "messages" (chat format) nor "prompt" and "completion" (prompt/completion format)'
    )


def _check_chat(where: str, value: dict) -> None:
    for key in value:
        if key in _UNSUPPORTED_CHAT_KEYS:
            raise InvalidTrainingFile(f"{where}: '{key}' is not supported; give the functions as \"tools\"")
        if key not in _CHAT_KEYS:
            raise InvalidTrainingFile(
                f'{where}: unexpected key \'{_shown(key)}\'; a chat line holds "messages" and optionally "tools"'
            )
    _check_tools(where, value.get("tools"))
    if not isinstance(value.get("parallel_tool_calls", True), bool):
        raise InvalidTrainingFile(f"{where}: parallel_tool_calls must be true or false")
    messages = value["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidTrainingFile(f'{where}: "messages" must be a non-empty list of messages')
    for index, message in enumerate(messages, start=1):
        _check_message(f"{where}, message {index}", message)
    if not any(_is_learnt(message) for message in messages):
        raise InvalidTrainingFile(
            f"{where}: no assistant message to learn from; add an assistant message with content "
            "(weight 1, or no weight)"
        )


def _check_message(where: str, message: Any) -> None:
    if not isinstance(message, dict):
        raise InvalidTrainingFile(f'{where} is a JSON {_json_type(message)}; a message is {{"role", "content"}}')
    for key in message:
        if key == "function_call":
            raise InvalidTrainingFile(f"{where}: 'function_call' is not supported; give calls as \"tool_calls\"")
        if key not in _MESSAGE_KEYS:
            raise InvalidTrainingFile(
                f"{where}: unexpected key '{_shown(key)}'; a message has role, content and optionally weight"
            )
    role = message.get("role")
    if role not in ROLES:
        shown = f"'{_shown(role)}'" if isinstance(role, str) else ("missing" if role is None else _json_type(role))
        raise InvalidTrainingFile(f"{where}: role {shown} is not one of {', '.join(ROLES)}")
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise InvalidTrainingFile(f"{where}: tool_calls are only for assistant messages")
        _check_tool_calls(where, calls)
    if (role == "tool") != ("tool_call_id" in message):
        raise InvalidTrainingFile(
            f"{where}: a tool message needs tool_call_id, the id of the call it answers; others have none"
        )
    if "tool_call_id" in message and not isinstance(message["tool_call_id"], str):
        raise InvalidTrainingFile(f"{where}: tool_call_id must be a string")
    content = message.get("content")
    if not isinstance(content, str) and not (calls and content is None):
        raise InvalidTrainingFile(f"{where}: content must be a string (or null beside tool_calls)")
    if "weight" in message:
        weight = message["weight"]
        if role != "assistant":
            raise InvalidTrainingFile(f"{where}: weight is only for assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise InvalidTrainingFile(f"{where}: weight must be 0 (not learnt) or 1 (learnt)")
    if "name" in message and not isinstance(message["name"], str):
        raise InvalidTrainingFile(f"{where}: name must be a string")


def _check_tools(where: str, tools: Any) -> None:
    if tools is None:
        return
    if not isinstance(tools, list) or not tools:
        raise InvalidTrainingFile(
            f'{where}: "tools" must be a non-empty list of {{"type": "function", "function": ...}}'
        )
    for index, tool in enumerate(tools, start=1):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidTrainingFile(
                f'{where}, tool {index}: a tool is {{"type": "function", "function": {{"name", ...}}}}'
            )
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidTrainingFile(f"{where}, tool {index}: the function needs a name")
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidTrainingFile(f"{where}, tool {index}: parameters must be a JSON Schema object")


def _check_tool_calls(where: str, calls: Any) -> None:
    if not isinstance(calls, list) or not calls:
        raise InvalidTrainingFile(f"{where}: tool_calls must be a non-empty list like [{_TOOL_CALL_EXAMPLE}]")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidTrainingFile(f"{where}: each tool call is like {_TOOL_CALL_EXAMPLE}")
        arguments = function.get("arguments")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidTrainingFile(
                f"{where}: the arguments of tool call {function['name']!r} must be a JSON object, as text"
            )


def _check_prompt_completion(where: str, value: dict) -> None:
    for key in value:
        if key not in ("prompt", "completion"):
            raise InvalidTrainingFile(
                f'{where}: unexpected key \'{_shown(key)}\'; a prompt/completion line holds only "prompt" and "completion"'
            )
    for key in ("prompt", "completion"):
        if key not in value:
            raise InvalidTrainingFile(f'{where}: "{key}" is missing; prompt/completion lines need both')
        if not isinstance(value[key], str):
            raise InvalidTrainingFile(f'{where}: "{key}" must be a string')
    if not value["completion"]:
        raise InvalidTrainingFile(f'{where}: "completion" is empty; there is nothing to learn')


def _is_learnt(message: dict) -> bool:
    said = bool(message.get("content")) or bool(message.get("tool_calls"))
    return message["role"] == "assistant" and message.get("weight", 1) == 1 and said


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number" if isinstance(value, int | float) else "object"


def _shown(text: str) -> str:
    return text if len(text) <= _MAX_ECHOED else text[:_MAX_ECHOED] + "..."


# -- tokenizing -----------------------------------------------------------------------------------


def _tokenize_chat(record: _Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation, learning the tokens of each learnt assistant turn.

    Each turn's span is found in characters, by rendering the conversation up to the turn (with
    the generation prompt: where the model starts answering at serving time) and up to its end;
    the rendered text is tokenized once, as serving tokenizes it, and a token is learnt when it
    lies inside a span. Tokenizing pieces separately could merge differently at their seams.
    """
    messages = [_template_message(m) for m in record.value["messages"]]
    tools = record.value.get("tools")
    render = functools.partial(_render, tokenizer, tools=tools, line=record.line)
    full = render(messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(record.value["messages"]):
        if not _is_learnt(message):
            continue
        through = render(messages[: index + 1], add_generation_prompt=False)
        content = message.get("content") or ""
        if index == 0:
            # Templates render no empty conversation: an opening assistant turn starts at its content.
            before = through[: through.find(content)] if content and content in through else through
        else:
            before = render(messages[:index], add_generation_prompt=True)
        if not (full.startswith(through) and through.startswith(before)):
            raise InvalidTrainingFile(
                f"line {record.line}: the base model's chat template renders this conversation differently "
                "turn by turn, so its assistant turns cannot be located; use prompt/completion lines"
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    eos = tokenizer.eos_token_id
    for start, end in spans:
        positions = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a >= start and b <= end and b > a]
        for position in positions:
            labels[position] = input_ids[position]
            # Whatever the template adds after the end-of-sequence token (a newline, say) is never
            # generated: serving stops at the EOS.
            if input_ids[position] == eos:
                break
    return input_ids, labels


def _template_message(message: dict) -> dict:
    """A message as templates take it (and serving hands it over): call arguments as objects."""
    out = {"role": message["role"], "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {
                "id": call.get("id", ""),
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])},
            }
            for call in message["tool_calls"]
        ]
    if "tool_call_id" in message:
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _render(
    tokenizer: Any, messages: list[dict], *, tools: list[dict] | None, line: int, add_generation_prompt: bool
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # templates raise their own errors (jinja's TemplateError, raise_exception)
        raise InvalidTrainingFile(f"line {line}: the base model's chat template refuses it: {exc}") from None


def _tokenize_prompt_completion(record: _Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    # The prompt is tokenized alone, with the tokenizer's special tokens, as /v1/completions does;
    # the completion then follows token by token, as it would be generated.
    prompt_ids = list(tokenizer(record.value["prompt"], add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(record.value["completion"], add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids

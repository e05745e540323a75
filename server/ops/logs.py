"""Logging setup: one JSON object per line, or plain text, on stderr.

Either way one record is one line, however its values came in: text escapes control characters
(JSON does by itself), and each value of a message is cut at MAX_VALUE_CHARS.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

# Everything a LogRecord carries by itself; any other attribute came in through `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# uvicorn adds an ANSI-coloured copy of its message, and vLLM tags every record with its process.
_DROPPED_EXTRAS = frozenset({"color_message", "vllm_process_name"})
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Enough for an engine's error message; a 4 MB model name must not make a 4 MB line.
MAX_VALUE_CHARS = 500
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators some viewers break lines at.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` on one line: newlines and every other control character written as escapes."""
    return _CONTROLS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED_CONTROLS.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`text`, or its first `limit` characters and an ellipsis."""
    return text if len(text) <= limit else text[:limit] + "…"


def _cut_value(value: Any) -> Any:
    if isinstance(value, str):
        return cut(value)
    if value is None or isinstance(value, int | float):
        return value  # %d and %.1f still apply
    shown = str(value)
    return value if len(shown) <= MAX_VALUE_CHARS else cut(shown)


def message_of(record: logging.LogRecord) -> str:
    """The record's message, as `getMessage` makes it, with each argument cut to MAX_VALUE_CHARS."""
    message = str(record.msg)
    args = record.args
    if isinstance(args, Mapping):
        return message % {key: _cut_value(value) for key, value in args.items()}
    if args:
        return message % tuple(_cut_value(value) for value in args)
    return message


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, one line per record (a traceback, when there is one, follows on its own lines)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(message_of(record))
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message_of(record),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in _DROPPED_EXTRAS and key not in entry:
                entry[key] = cut(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class _GatewayHandler(logging.StreamHandler):
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(level: str, fmt: str) -> None:
    """Send every logger's records to stderr as `fmt` ("json" or "text"), at `level` and above."""
    if fmt not in {"json", "text"}:
        raise ValueError(f"log format must be json or text, got {fmt!r}")
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _GatewayHandler)]:
        root.removeHandler(handler)
    handler = _GatewayHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())

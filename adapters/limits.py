"""Caps on what is read from a tenant's files, checked before anything is parsed.

The same caps apply wherever those files are read: uploads, the store's fetch, folders registered
from a path, conversion, composition and validation. Each is far above what a real adapter
needs, and far below what would hurt the server: json recurses once per level of nesting, and
CPython's tarfile reads a whole extended header into memory when it meets one.

The helpers raise `OverLimit`, a ValueError whose message completes a sentence naming the file
("adapter_config.json is nested 40 levels deep; ..."), so each caller raises its own error type.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

MAX_CONFIG_BYTES = 64 * 1024  # adapter_config.json; PEFT writes about 1 KiB
# A LoRA of a 70B model on all seven projections has a header of about 200 KiB.
MAX_SAFETENSORS_HEADER_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32  # PEFT's configs, safetensors headers and training lines nest 3 or 4 levels
MAX_ARCHIVE_MEMBERS = 64  # tar headers of every kind: files, folders and extended headers
MAX_EXTENDED_HEADER_BYTES = 64 * 1024  # one PAX or GNU long-name header
ARCHIVE_OVERHEAD_BYTES = 1024 * 1024  # what a tar adds to its files' bytes: headers, padding, end blocks
# PEFT scales the delta B A by lora_alpha / r (alpha / sqrt(r) with rsLoRA); its defaults give 1 or 2.
MAX_LORA_SCALING = 10_000

# A JSON string, through its closing quote or the end of the input, whichever comes first: the
# possessive quantifiers and the end as a way out keep this linear on any input.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\(?:[\s\S]|\Z))*+(?:"|\Z)')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_STEPS = bytes(1 if c in b"[{" else 255 if c in b"]}" else 0 for c in range(256))  # 255 is -1 as int8


class OverLimit(ValueError):
    """Input past a cap; the message completes a sentence that starts with the file's name."""


def json_depth(raw: bytes) -> int:
    """How deeply `raw`'s arrays and objects nest, brackets inside strings not counted.

    Linear, and in C throughout: strings are cut out, the brackets left become +1 and -1, and
    the depth is the largest running sum.
    """
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    steps = memoryview(brackets.translate(_BRACKET_STEPS)).cast("b")
    return max(accumulate(steps), default=0)


def load_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads, once the nesting is known to be within `max_depth`.

    Raises ValueError for anything else: OverLimit when nested too deeply, json's own
    JSONDecodeError or UnicodeDecodeError when it is not JSON.
    """
    depth = json_depth(raw)
    if depth > max_depth:
        raise OverLimit(f"is nested {depth} levels deep; at most {max_depth} levels are accepted")
    try:
        return json.loads(raw)
    except RecursionError:  # not expected within max_depth; still never a 500
        raise OverLimit(f"is nested too deeply; at most {max_depth} levels are accepted") from None


def read_capped(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, reading no more than one byte past `max_bytes`."""
    with open(path, "rb") as reader:
        raw = reader.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise OverLimit(f"is over {max_bytes} bytes; at most {max_bytes} bytes are accepted")
    return raw


def lora_alpha_problem(alpha: Any, rank: int) -> str | None:
    """What is wrong with `lora_alpha` for an adapter of rank `rank` (a valid one), or None."""
    most = MAX_LORA_SCALING * rank
    expected = f"a number above 0 and at most {most} ({MAX_LORA_SCALING} × r); PEFT's usual values are r or 2 × r"
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        return f"lora_alpha is {_json_type(alpha)}; it must be {expected}"
    if (isinstance(alpha, float) and not math.isfinite(alpha)) or not 0 < alpha <= most:
        return f"lora_alpha is {_shown_number(alpha)}; it must be {expected}"
    return None


def _shown_number(value: int | float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:24] + "..."


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), "not a number")

"""Which work is background work: batch lines run with `background()` set, interactive requests without.

A scheduler of generation (the Generator's admission, a fair queue) can read `is_background()`
to run background work after interactive work; it needs nothing else from the batch runner.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_BACKGROUND: ContextVar[bool] = ContextVar("lora_gateway_background", default=False)


def is_background() -> bool:
    """True inside work started for a batch line (the context of its task and what it awaits)."""
    return _BACKGROUND.get()


@contextmanager
def background() -> Iterator[None]:
    token = _BACKGROUND.set(True)
    try:
        yield
    finally:
        _BACKGROUND.reset(token)

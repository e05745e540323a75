"""A race that asyncio.wait_for (3.11) loses, played out step by step for a test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest


async def cancel_as_it_takes_the_slot(slots: asyncio.Semaphore, call: Awaitable) -> None:
    """Hold `slots`' only slot, start `call` waiting for it, free the slot, let `call` take it,
    and cancel `call` in that same step: `call` must end cancelled, not run on as if its caller
    were there (3.11's wait_for returned the acquire's result instead)."""
    await slots.acquire()  # another caller's work holds the only slot
    waiting = asyncio.ensure_future(call)
    while not slots._waiters:
        await asyncio.sleep(0)
    slots.release()  # that work ends...
    await asyncio.sleep(0)  # ...the waiter takes the slot...
    waiting.cancel()  # ...as its client leaves
    with pytest.raises(asyncio.CancelledError):
        await waiting

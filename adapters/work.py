"""Slow adapter work in a pool of its own, and sandbox slots taken before any thread is.

Conversions, validation, compositions and training-file checks can each take seconds, and a
pickle's conversion waits for one of the few sandbox slots. Run on the default thread pool, ten
such uploads from one tenant would hold every thread that another tenant's catalog reads and
store calls need. So they run here: a thread pool sized apart (--adapter-work-threads), and an
asyncio semaphore for the sandbox, taken on the event loop before a thread is asked for, so that
uploads waiting for a slot hold no thread at all.

A slot, like a thread, is held until its work ends, even when the caller has gone: the child
process runs on, and counting it as free would start more children than there are slots.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from adapters.errors import ConverterBusy
from adapters.sandbox import DEFAULT_LIMITS

T = TypeVar("T")
DEFAULT_THREADS = 4


class WorkPool:
    """Threads for slow adapter work, and the slots of the sandbox that converts pickles."""

    def __init__(
        self,
        threads: int = DEFAULT_THREADS,
        sandbox_slots: int = DEFAULT_LIMITS.concurrent_loads,
        sandbox_wait_seconds: float = DEFAULT_LIMITS.wall_seconds,
    ):
        if threads < 1 or sandbox_slots < 1:
            raise ValueError("a work pool needs at least one thread and one sandbox slot")
        self.threads = threads
        self.sandbox_slots = sandbox_slots
        self.sandbox_wait_seconds = sandbox_wait_seconds
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="adapter-work")
        self._sandbox = asyncio.Semaphore(sandbox_slots)
        self.sandbox_waiting = 0  # callers waiting for a slot, on the event loop

    async def run(self, call: Callable[..., T], *args) -> T:
        """`call(*args)` on one of this pool's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(call, *args))

    async def run_sandboxed(self, call: Callable[..., T], *args) -> T:
        """`call(*args)`, which starts a sandboxed child, once a slot is free; ConverterBusy past the wait."""
        self.sandbox_waiting += 1
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancel that meets the
            # acquire, and the caller then runs its conversion for a client that has gone.
            async with asyncio.timeout(self.sandbox_wait_seconds):
                await self._sandbox.acquire()
        except TimeoutError:
            raise ConverterBusy(
                f"all {self.sandbox_slots} converters of pickled weights stayed busy for "
                f"{self.sandbox_wait_seconds:g} s; retry shortly, or send safetensors"
            ) from None
        finally:
            self.sandbox_waiting -= 1
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, functools.partial(call, *args))
        except BaseException:
            self._sandbox.release()
            raise
        future.add_done_callback(lambda _: self._sandbox.release())
        return await asyncio.shield(future)

    def close(self) -> None:
        """Let the threads end; a later call starts new ones (threads start only when work comes)."""
        executor, self._executor = self._executor, ThreadPoolExecutor(self.threads, thread_name_prefix="adapter-work")
        executor.shutdown(wait=False, cancel_futures=True)

"""The engine's processes die with the gateway: a vLLM general plugin.

vLLM's engine core is a spawned child of the gateway and its workers are spawned children of the
engine core. A gateway killed with SIGKILL runs no cleanup, and the engine core did not notice:
it held its several GiB until someone killed it by hand. vLLM loads general plugins in the
engine core and in each worker before they start any process of their own, so this one asks the
kernel there to send SIGKILL when the parent dies (PR_SET_PDEATHSIG), and exits at once when the
parent is already gone. The chain holds: the gateway dies, then the engine core, then its workers.

It acts only where ENV names the parent, which `armed` sets in the gateway while the engine
starts, and each process sets it to itself for its own children. The kernel sends the signal
when the parent *thread* exits, so `armed` sets it only on the main thread, which lives as long as the process; vLLM starts the
engine core from the thread that builds the engine, and the workers from the engine core's main
thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from adapters.confine import ConfinementUnavailable, die_with_parent

logger = logging.getLogger(__name__)

ENV = "LORA_GATEWAY_ENGINE_PARENT"  # the pid of the process that started this one
_armed: list[int] = []


@contextmanager
def armed() -> Iterator[None]:
    """In the gateway, around the engine's start: the processes started meanwhile die with this one.

    Only meanwhile: a process the gateway starts later (a merge, another gateway in a test) must
    not take this process for its parent.
    """
    if threading.current_thread() is threading.main_thread():
        os.environ[ENV] = str(os.getpid())
    else:
        logger.warning("engine started off the main thread: its processes will not die with this one")
    try:
        yield
    finally:
        os.environ.pop(ENV, None)


def register() -> None:
    """The entry point vLLM calls in each of its processes."""
    value = os.environ.get(ENV)
    if not value or int(value) == os.getpid() or _armed:
        return  # not the gateway's engine; the gateway itself; or loaded once already
    try:
        die_with_parent(int(value))
    except ConfinementUnavailable as exc:
        logger.warning("engine process %d will not die with its parent: %s", os.getpid(), exc)
        return
    _armed.append(int(value))
    os.environ[ENV] = str(os.getpid())  # for this process's own children

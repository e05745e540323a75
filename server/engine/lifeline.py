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

Each process also leaves promptly once its work is done (`exit_now`). After vLLM's own teardown,
the interpreter's took 5 s and more in the engine core: its final garbage collections walk some
800,000 objects (torch, transformers, vLLM) several times over. vLLM gives the engine core 5 s
before it kills it, so every stop took 7 s and ended in a SIGKILL; the gateway's own teardown took
2 to 3 s more. Nothing of ours waits on that teardown: the exit handlers still run, the output is
flushed, and the exit code is kept.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

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
    leave_when_done()


EXITING = "process exiting with exitcode "


class _LeaveWhenDone(logging.Filter):
    """On multiprocessing's last word in a spawned process, which its bootstrap logs once the
    process's work, its children and its non-daemon threads are done: run the exit handlers, flush,
    and exit with that code, without the interpreter's teardown."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(EXITING) and message[len(EXITING) :].strip().lstrip("-").isdigit():
            exit_now(int(message[len(EXITING) :]))
        return False  # multiprocessing's other lines stay as unlogged as they were


def leave_when_done() -> None:
    """In a spawned engine process: exit as soon as multiprocessing says with which code."""
    import multiprocessing.util

    mp_logger = multiprocessing.util.get_logger()
    if not any(isinstance(f, _LeaveWhenDone) for f in mp_logger.filters):
        mp_logger.addFilter(_LeaveWhenDone())
        mp_logger.setLevel(min(mp_logger.level or logging.INFO, logging.INFO))


def exit_now(code: int) -> NoReturn:
    """Run the exit handlers (Ray's shutdown, the log handlers' flush), flush the output, and exit
    with `code`, without the interpreter's teardown."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(code)

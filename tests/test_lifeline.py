"""An engine process leaves as soon as multiprocessing reports its exit code: it keeps that code
and runs its exit handlers, but skips the interpreter's teardown (server/engine/lifeline.py)."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import pytest

from server.engine.lifeline import leave_when_done


class TornDown:
    """Writes its file when the interpreter's teardown collects it."""

    def __init__(self, path: str):
        self.path = path

    def __del__(self):
        Path(self.path).write_text("torn down")


def _child(folder: str, outcome: str, leave: bool) -> None:
    import atexit

    if leave:
        leave_when_done()
    atexit.register(lambda: (Path(folder) / "atexit").write_text("exit handlers ran"))
    sys.modules["__mp_main__"].kept = TornDown(str(Path(folder) / "teardown"))
    if outcome == "raise":
        raise RuntimeError("the engine failed")
    if outcome == "exit 7":
        sys.exit(7)


def run(folder: Path, outcome: str, leave: bool) -> int | None:
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(str(folder), outcome, leave))
    process.start()
    process.join(60)
    return process.exitcode


@pytest.mark.parametrize(("outcome", "code"), [("return", 0), ("exit 7", 7), ("raise", 1)])
def test_a_spawned_process_keeps_its_exit_code_and_exit_handlers_and_skips_the_teardown(tmp_path, outcome, code):
    assert run(tmp_path, outcome, leave=True) == code
    assert (tmp_path / "atexit").read_text() == "exit handlers ran"
    assert not (tmp_path / "teardown").exists()


def test_without_it_the_teardown_runs(tmp_path):
    assert run(tmp_path, "return", leave=False) == 0
    assert (tmp_path / "teardown").read_text() == "torn down"

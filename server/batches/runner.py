"""Runs batches: claims them from the catalog, runs their lines at the lowest priority, writes their files.

Each gateway runs up to --batch-max-running batches. A batch is claimed with a conditional update,
so one gateway of a shared catalog runs it; that gateway beats its heartbeat every second, and
looks at the same time for a cancel, the batch's expiry, or its row gone (its tenant deleted).

- **Yielding.** A line starts only while fewer than --batch-yield-below interactive sequences are
  in flight here, and at most --batch-lines-per-batch of a batch and --batch-lines-in-flight of
  all batches run at once. Lines run marked as background work (server/http/priority.py).
- **Durable.** Each line's result is kept in the catalog as it ends. A gateway that starts again
  takes back the batches it was running, and a batch whose heartbeat stopped for STALE_SECONDS is
  taken over by another gateway: either runs only the lines not done yet.
- **Endings.** All lines done: `finalizing`, then `completed` with its output and error files.
  Cancelled: the lines in flight are stopped, what was done is written, `cancelled`. Past its
  window: the same, with each line not run in the error file as `batch_expired`, `expired`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.batches_db import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    UNFINISHED,
    BatchGone,
    BatchRecords,
    BatchRow,
    LineResult,
)
from adapters.errors import OwnerNotFound, Unavailable
from server.batches.lines import line_sequences, run_line
from server.batches.protocol import BATCH_OUTPUT, InvalidBatchFile, read_lines
from server.finetune.files import FileNotFound, TrainingFiles
from server.openai.generation import Generator

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
STALE_SECONDS = 30.0
YIELD_POLL_SECONDS = 0.01
RETRY_SECONDS = 1.0


class BatchRunner:
    """One per gateway: the loop that claims batches and runs them."""

    def __init__(
        self,
        records: BatchRecords,
        files: TrainingFiles,
        generator: Generator,
        *,
        app: Any,
        runner_id: str,
        work_dir: Path,
        max_running: int,
        lines_in_flight: int,
        lines_per_batch: int,
        yield_below: int,
        max_lines: int,
        max_line_bytes: int,
        clock: Callable[[], float] = time.time,
    ):
        self.records = records
        self.files = files
        self.generator = generator
        self.app = app  # what the routes a line runs through read from their request's app
        self.runner_id = runner_id
        self.work_dir = work_dir
        self.max_running = max_running
        self.lines_per_batch = lines_per_batch
        self.yield_below = yield_below
        self.max_lines = max_lines
        self.max_line_bytes = max_line_bytes
        self.clock = clock
        self.background_sequences = 0  # this runner's lines' sequences in the generator's count
        self._slots = asyncio.Semaphore(lines_in_flight)
        self._running: dict[str, tuple[asyncio.Task, asyncio.Event]] = {}
        self._claim_now = asyncio.Event()

    @property
    def interactive_sequences(self) -> int:
        return max(0, self.generator.in_flight - self.background_sequences)

    async def run(self) -> None:
        """The loop, until cancelled; a catalog that cannot be reached is retried."""
        while True:
            try:
                await self._claim()
            except Unavailable:
                logger.warning("batches: the catalog or store is unreachable; retrying")
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                logger.exception("batch runner step failed")
            self._claim_now.clear()
            # asyncio.wait, not wait_for: 3.11's wait_for can swallow a cancel that meets a poke.
            poked = asyncio.ensure_future(self._claim_now.wait())
            try:
                await asyncio.wait({poked}, timeout=POLL_SECONDS)
            finally:
                poked.cancel()

    def poke(self) -> None:
        """Look for work now (a batch was just created here)."""
        self._claim_now.set()

    def stop_batch(self, batch_id: str) -> bool:
        """Stop a batch running here now (a cancel through this gateway); False if it is not here."""
        if (running := self._running.get(batch_id)) is None:
            return False
        running[1].set()
        return True

    async def wait_finished(self, batch_id: str, timeout: float) -> None:
        if (running := self._running.get(batch_id)) is not None:
            await asyncio.wait({running[0]}, timeout=timeout)

    async def close(self) -> None:
        """At shutdown: stop every batch here; each keeps what was done, and runs on after a restart."""
        for task, _ in self._running.values():
            task.cancel()
        await asyncio.gather(*(task for task, _ in self._running.values()), return_exceptions=True)

    async def _claim(self) -> None:
        while len(self._running) < self.max_running:
            stale_before = self.clock() - STALE_SECONDS
            batch = await asyncio.to_thread(self.records.claim, self.runner_id, stale_before, set(self._running))
            if batch is None:
                return
            stop = asyncio.Event()
            task = asyncio.create_task(self._run(batch, stop))
            self._running[batch.id] = (task, stop)
            task.add_done_callback(lambda _, batch_id=batch.id: self._running.pop(batch_id, None))

    # -- one batch -----------------------------------------------------------------------------

    async def _run(self, batch: BatchRow, stop: asyncio.Event) -> None:
        source = self.work_dir / f"{batch.id}.{uuid.uuid4().hex[:8]}.jsonl"
        watcher = asyncio.create_task(self._watch(batch, stop))
        try:
            if batch.status == IN_PROGRESS and self.clock() < batch.expires_at:
                logger.info(
                    "batch %s: running (%d lines, %d done)", batch.id, batch.total, batch.completed + batch.failed
                )
                await self.files.fetch(batch.input_file_id, source)
                await self._lines(batch, source, stop)
            await self._end(batch.id, source)
        except asyncio.CancelledError:
            raise  # shutting down: the batch stays claimed by this runner and resumes after a restart
        except (BatchGone, OwnerNotFound):
            logger.info("batch %s was deleted with its tenant; nothing of it is kept", batch.id)
        except FileNotFound:
            await self._fail(batch.id, "input_file_missing", f"the input file {batch.input_file_id} was deleted")
        except InvalidBatchFile as exc:
            await self._fail(batch.id, "invalid_input_file", exc.message)
        except Exception:  # noqa: BLE001 - any failure ends this batch only
            logger.exception("batch %s failed", batch.id)
            await self._fail(batch.id, "internal_error", "the batch failed; the gateway's log has the cause")
        finally:
            watcher.cancel()
            source.unlink(missing_ok=True)

    async def _watch(self, batch: BatchRow, stop: asyncio.Event) -> None:
        """Beat the heartbeat; stop the lines on a cancel, at the expiry, or when the row is gone."""
        while not stop.is_set():
            await asyncio.sleep(POLL_SECONDS)
            try:
                row = await asyncio.to_thread(self.records.heartbeat, batch.id, self.runner_id)
            except Unavailable:
                continue
            if row is None or row.status != IN_PROGRESS or self.clock() >= row.expires_at:
                stop.set()

    async def _lines(self, batch: BatchRow, source: Path, stop: asyncio.Event) -> None:
        done = await asyncio.to_thread(self.records.done_lines, batch.id)
        in_flight: set[asyncio.Task] = set()
        batch_slots = asyncio.Semaphore(self.lines_per_batch)
        failure: list[BaseException] = []

        async def one(line, sequences: int) -> None:
            try:
                await self._line(batch, line, sequences, stop)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the batch
                failure.append(exc)
                stop.set()

        def finished(task: asyncio.Task) -> None:
            # A callback, not a `finally`: a task cancelled before it first ran never reaches its own.
            in_flight.discard(task)
            batch_slots.release()
            self._slots.release()

        try:
            with source.open("rb") as stream:
                for line in read_lines(stream, self.max_lines, self.max_line_bytes):
                    if line.number in done:
                        continue
                    if not await _acquire(batch_slots, stop):
                        break
                    if not await _acquire(self._slots, stop):
                        batch_slots.release()
                        break
                    while not stop.is_set() and self.interactive_sequences >= self.yield_below:
                        await asyncio.sleep(YIELD_POLL_SECONDS)
                    if stop.is_set():
                        batch_slots.release()
                        self._slots.release()
                        break
                    sequences = line_sequences(batch.endpoint, line.body)
                    task = asyncio.create_task(one(line, sequences))
                    in_flight.add(task)
                    task.add_done_callback(finished)
                    await asyncio.sleep(0)  # let it start: its sequences count from now
            while in_flight and not stop.is_set():
                await asyncio.wait(set(in_flight), timeout=POLL_SECONDS)
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)
        if failure:
            raise failure[0]

    async def _line(self, batch: BatchRow, line, sequences: int, stop: asyncio.Event) -> None:
        while True:
            self.background_sequences += sequences
            try:
                answer = await run_line(self.app, self.generator, batch.owner, batch.endpoint, line.body)
            finally:
                self.background_sequences -= sequences
            if not answer.retry:
                break
            # Overloaded, or the tenant at its limits: not this line's fault; it waits its turn.
            await asyncio.sleep(RETRY_SECONDS)
            while not stop.is_set() and self.interactive_sequences >= self.yield_below:
                await asyncio.sleep(YIELD_POLL_SECONDS)
            if stop.is_set():
                return
        result = LineResult(line.number, answer.ok, answer.output_line(line.custom_id))
        await self._catalog(self.records.record_line_once, batch.id, result)

    async def _catalog(self, call, *args) -> Any:
        """A catalog write that must not be lost to a moment's outage: tried again until it lands."""
        while True:
            try:
                return await asyncio.to_thread(call, *args)
            except Unavailable:
                await asyncio.sleep(RETRY_SECONDS)

    # -- endings -------------------------------------------------------------------------------

    async def _end(self, batch_id: str, source: Path) -> None:
        """Write the files of what was done and give the batch its final status."""
        row = await asyncio.to_thread(self.records.get, batch_id)
        if row is None:
            raise BatchGone(batch_id)
        if row.status not in UNFINISHED:
            return
        if row.status == CANCELLING:
            final = CANCELLED
        elif self.clock() >= row.expires_at:
            final = EXPIRED
        elif row.status == IN_PROGRESS and row.completed + row.failed < row.total:
            return  # stopped before the end (taken over by another runner): nothing to end here
        else:
            final = COMPLETED
            await asyncio.to_thread(self.records.set_status, batch_id, FINALIZING, only_if=(IN_PROGRESS,))
        results = await asyncio.to_thread(self.records.results, batch_id)
        outputs = [r.result for r in results if r.ok]
        errors = [r.result for r in results if not r.ok]
        if final == EXPIRED:
            with contextlib.suppress(FileNotFound):
                if not source.exists():
                    await self.files.fetch(row.input_file_id, source)
                errors += await asyncio.to_thread(self._expired_lines, {r.line for r in results}, source)
        output_file = await self._file(row, "batch_output.jsonl", outputs)
        error_file = await self._file(row, "batch_errors.jsonl", errors)
        ended = await asyncio.to_thread(
            self.records.finish,
            batch_id,
            final,
            only_if=(FINALIZING, CANCELLING, IN_PROGRESS),
            output_file_id=output_file,
            error_file_id=error_file,
        )
        if ended:
            logger.info("batch %s %s: %d lines succeeded, %d failed", batch_id, final, row.completed, row.failed)

    def _expired_lines(self, done: set[int], source: Path) -> list[dict[str, Any]]:
        error = {"code": "batch_expired", "message": "the batch's completion window ended before this line ran"}
        with source.open("rb") as stream:
            return [
                {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id, "response": None, "error": error}
                for line in read_lines(stream, self.max_lines, self.max_line_bytes)
                if line.number not in done
            ]

    async def _file(self, row: BatchRow, filename: str, lines: list[dict[str, Any]]) -> str | None:
        if not lines:
            return None
        raw = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        added = await self.files.add(row.owner, filename, BATCH_OUTPUT, raw, {"batch": row.id, "lines": len(lines)})
        return added.id

    async def _fail(self, batch_id: str, code: str, message: str) -> None:
        errors = [{"code": code, "message": message, "param": None, "line": None}]
        with contextlib.suppress(Unavailable):
            if await asyncio.to_thread(self.records.finish, batch_id, FAILED, only_if=UNFINISHED, errors=errors):
                logger.warning("batch %s failed: %s", batch_id, message)


async def _acquire(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Take a slot, unless `stop` is set first; True if taken."""
    taking = asyncio.ensure_future(slots.acquire())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({taking, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not taking.done():
            taking.cancel()
    await asyncio.gather(taking, return_exceptions=True)
    taken = taking.done() and not taking.cancelled() and taking.exception() is None
    if taken and stop.is_set():
        slots.release()
        return False
    return taken

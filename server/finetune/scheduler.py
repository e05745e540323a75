"""Runs fine-tuning jobs: validates their files, claims queued ones, trains, registers the result.

Each gateway runs up to --max-training-jobs at once. A job is claimed from the catalog with a
conditional update, so one gateway of a shared catalog runs it; while it runs, that gateway
writes a heartbeat every few seconds and looks for a cancel request every second.

A job is never left running forever:
- a gateway that starts again finds the jobs its previous run left running and marks them
  failed: training is not resumed, the checkpoints are kept;
- a job whose heartbeat stops (its gateway died and did not come back) is marked failed by any
  gateway after STALE_SECONDS;
- a job whose row is gone (its tenant was deleted, through any gateway) stops within a second, and
  whatever it was writing (events, a checkpoint, its adapter, its results file) is refused;
- a job that runs past its wall-clock limit (--max-training-seconds, or its tenant's
  `max_training_seconds`) is stopped and fails with `time_limit_exceeded`; its checkpoints stay.

Queued jobs are claimed round robin across tenants (`FineTuningRecords.claim_next`).

The result goes through the same staging, validation and store as an upload, and is registered as
the tenant's adapter under the job's `fine_tuned_model` name.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adapters.errors import AdapterError, JobGone, OwnerNotFound, Unavailable
from adapters.fine_tuning_db import (
    QUEUED,
    RUNNING,
    CheckpointRow,
    FileRow,
    FineTuningRecords,
    JobRow,
    checkpoint_blob_key,
)
from adapters.registry import Registry
from adapters.store import copy_folder
from server.finetune.files import RESULTS, FileNotFound, TrainingFiles
from server.finetune.jobs import VALIDATING, new_event
from server.finetune.runners import Runner, pack

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
RESTARTED = "the gateway running this job restarted; training is not resumed, create the job again"
VANISHED = "the gateway running this job stopped answering; create the job again"


class JobFailed(Exception):
    """A job ends as failed; args are (code, message), both safe to show."""


class SchedulerMetrics(Protocol):
    """What the scheduler counts (server/ops/metrics.py's GatewayMetrics has these)."""

    fine_tuning_jobs: Any
    fine_tuning_running: Any
    fine_tuning_steps: Any


class TrainingScheduler:
    """One per gateway: the loop that moves jobs through their statuses."""

    def __init__(
        self,
        records: FineTuningRecords,
        files: TrainingFiles,
        registry: Registry,
        runner: Runner,
        *,
        base_dir: Path,
        work_dir: Path,
        runner_id: str,
        max_jobs: int,
        device: str,
        threads: int,
        max_adapter_bytes: int,
        max_length: int = 1024,
        metrics: SchedulerMetrics | None = None,
        time_limit: Callable[[str], float] | None = None,
    ):
        self.records = records
        self.files = files
        self.registry = registry
        self.runner = runner
        self.base_dir = base_dir
        self.work_dir = work_dir
        self.runner_id = runner_id
        self.max_jobs = max_jobs
        self.device = device
        self.threads = threads
        self.max_adapter_bytes = max_adapter_bytes
        self.max_length = max_length
        self.metrics = metrics
        self.time_limit = time_limit  # owner -> wall-clock seconds a job may run; None: no limit
        self._running: dict[str, tuple[asyncio.Task, asyncio.Event]] = {}
        self._woken = asyncio.Event()
        if metrics is not None:
            metrics.fine_tuning_running.set_function(lambda: len(self._running))

    async def run(self) -> None:
        """The loop, until cancelled; a catalog that cannot be reached is retried."""
        recovered = False
        while True:
            try:
                if not recovered:
                    await self._fail_left_running()
                    recovered = True
                await self._tick()
            except Unavailable:
                logger.warning("fine-tuning: the catalog or store is unreachable; retrying")
            except Exception:  # noqa: BLE001 - the loop must outlive any one failure
                logger.exception("fine-tuning scheduler step failed")
            # The next poll, or sooner when a job is created here. asyncio.timeout, not wait_for:
            # 3.11's wait_for swallows a cancel that meets a wake, and the loop then outlives close().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._woken.wait()
            self._woken.clear()

    def wake(self) -> None:
        """A job was created through this gateway: validate it now, not at the next poll."""
        self._woken.set()

    async def close(self) -> None:
        """At shutdown: stop the workers; their jobs fail, as after a crash."""
        for task, stop in self._running.values():
            stop.set()
            task.cancel()
        await asyncio.gather(*(task for task, _ in self._running.values()), return_exceptions=True)

    def stop_job(self, job_id: str) -> bool:
        """Stop a job running here now (a cancel through this gateway); False if it is not here."""
        if (running := self._running.get(job_id)) is None:
            return False
        running[1].set()
        return True

    async def wait_finished(self, job_id: str, timeout: float) -> None:
        if (running := self._running.get(job_id)) is not None:
            await asyncio.wait({running[0]}, timeout=timeout)

    # -- the loop ------------------------------------------------------------------------------

    async def _fail_left_running(self) -> None:
        for job in await asyncio.to_thread(self.records.running):
            if job.runner == self.runner_id:  # at start nothing runs here yet: these are the last run's
                await self._finish_failed(job.id, "gateway_restarted", RESTARTED, only_if=(RUNNING,))

    async def _tick(self) -> None:
        for job in await asyncio.to_thread(self.records.waiting_validation):
            await self._validate(job)
        stale_before = time.time() - STALE_SECONDS
        for job in await asyncio.to_thread(self.records.running):
            if job.id not in self._running and (job.heartbeat_at or 0) < stale_before:
                await self._finish_failed(job.id, "runner_lost", VANISHED, only_if=(RUNNING,))
        while len(self._running) < self.max_jobs:
            job = await asyncio.to_thread(self.records.claim_next, self.runner_id)
            if job is None:
                break
            stop = asyncio.Event()
            task = asyncio.create_task(self._run(job, stop))
            self._running[job.id] = (task, stop)
            task.add_done_callback(lambda _, job_id=job.id: self._running.pop(job_id, None))

    async def _validate(self, job: JobRow) -> None:
        """Check the files are still there, then queue the job.

        Their content was validated at upload and never changes, so it is not read again here.
        """
        problem = None
        for key in ("training_file", "validation_file"):
            file_id = job.request.get(key)
            if not file_id:
                continue
            row = await asyncio.to_thread(self.records.file, file_id)
            if row is None or row.owner != job.owner:
                problem = f"the {key.replace('_', ' ')} {file_id} was deleted"
                break
        if problem is not None:
            await self._finish_failed(job.id, "invalid_training_file", problem, only_if=(VALIDATING,))
            return
        if await asyncio.to_thread(self.records.update_job, job.id, only_if=(VALIDATING,), status="queued"):
            await self._event(job.id, "Files validated, moving job to queued state")

    # -- one job -------------------------------------------------------------------------------

    async def _run(self, job: JobRow, stop: asyncio.Event) -> None:
        job_dir = self.work_dir / job.id
        heartbeat = asyncio.create_task(self._heartbeat(job.id, stop))
        clock = _Clock(time.monotonic())
        try:
            shutil.rmtree(job_dir, ignore_errors=True)
            job_dir.mkdir(parents=True)
            await self._event(job.id, "Fine-tuning job started")
            spec = await self._spec(job, job_dir)
            result = await self._train(job, spec, job_dir, stop, clock)
            if result is None and clock.expired is not None:
                raise JobFailed("time_limit_exceeded", _time_limit_message(job.id, clock.expired))
            if result is None:
                await self._finish_cancelled(job.id)
                return
            await self._register(job, result)
        except asyncio.CancelledError:
            # Shutting down: the job cannot finish here.
            await asyncio.shield(self._finish_failed(job.id, "gateway_restarted", RESTARTED, only_if=(RUNNING,)))
            raise
        except (JobGone, OwnerNotFound):
            logger.info("fine-tuning job %s was deleted with its tenant; nothing of it is kept", job.id)
        except JobFailed as exc:
            code, message = exc.args
            await self._finish_failed(job.id, code, message, only_if=(RUNNING,))
        except AdapterError as exc:
            await self._finish_failed(job.id, "invalid_result", exc.message, only_if=(RUNNING,))
        except Exception:  # noqa: BLE001 - any failure ends this job only
            logger.exception("fine-tuning job %s failed", job.id)
            await self._finish_failed(job.id, "internal_error", "the job failed; the gateway's log has the cause")
        finally:
            heartbeat.cancel()
            shutil.rmtree(job_dir, ignore_errors=True)

    async def _spec(self, job: JobRow, job_dir: Path) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "base_model_dir": str(self.base_dir),
            "out_dir": str(job_dir / "out"),
            "hyperparameters": job.request["hyperparameters"],
            "lora": job.request["lora"],
            "seed": job.request["seed"],
            "threads": self.threads,
            "device": self.device,
            "training_file": str(job_dir / "train.jsonl"),
            "validation_file": None,
            "max_length": self.max_length,
            "base_model_name": self.registry.base_name,
        }
        try:
            await self.files.fetch(job.request["training_file"], job_dir / "train.jsonl")
            if job.request.get("validation_file"):
                spec["validation_file"] = str(job_dir / "valid.jsonl")
                await self.files.fetch(job.request["validation_file"], job_dir / "valid.jsonl")
        except FileNotFound as exc:
            raise JobFailed("invalid_training_file", exc.message) from None
        return spec

    async def _train(
        self, job: JobRow, spec: dict[str, Any], job_dir: Path, stop: asyncio.Event, clock: _Clock | None = None
    ) -> dict | None:
        """Run the worker to its end: its last event, or None when it was cancelled or ran out of time."""
        watcher = asyncio.create_task(self._watch_cancel(job, stop, clock or _Clock(time.monotonic())))
        metrics: list[dict[str, Any]] = []
        previous_step = 0  # metrics events may skip steps on long jobs
        try:
            async for event in self.runner.run(spec, job_dir, stop):
                kind = event["type"]
                if kind == "metrics":
                    metrics.append(event)
                    if self.metrics is not None:
                        self.metrics.fine_tuning_steps.inc(max(0, int(event.get("step", 0)) - previous_step))
                        previous_step = int(event.get("step", 0))
                    await self._metrics_event(job.id, event)
                elif kind == "checkpoint":
                    await self._checkpoint(job, event)
                elif kind == "message":
                    level = {"warning": "warn"}.get(event.get("level"), event.get("level", "info"))
                    await self._event(job.id, str(event.get("message", ""))[:2000], level=level)
                elif kind == "succeeded":
                    return {**event, "metrics": metrics}
                elif kind == "cancelled":
                    return None
                elif kind == "failed":
                    raise JobFailed("training_failed", str(event.get("message", "training failed"))[:2000])
        finally:
            watcher.cancel()
        if stop.is_set():
            return None
        raise JobFailed("training_failed", "the training process ended without a result")

    async def _watch_cancel(self, job: JobRow, stop: asyncio.Event, clock: _Clock) -> None:
        """Stop the job when it is cancelled, deleted, or past its time limit (read each second, so a
        limit lowered by the admin applies to the jobs running)."""
        job_id = job.id
        while not stop.is_set():
            await asyncio.sleep(POLL_SECONDS)
            limit = self.time_limit(job.owner) if self.time_limit is not None else None
            if limit is not None and time.monotonic() - clock.started > limit:
                clock.expired = limit
                stop.set()
                return
            try:
                row = await asyncio.to_thread(self.records.job, job_id)
            except Unavailable:
                continue
            if row is None or row.cancel_requested:  # None: deleted with its tenant
                stop.set()

    async def _heartbeat(self, job_id: str, stop: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                await asyncio.to_thread(self.records.update_job, job_id, only_if=(RUNNING,), heartbeat_at=time.time())
            except Unavailable:
                pass  # the next beat may get through; STALE_SECONDS leaves room for many

    async def _metrics_event(self, job_id: str, event: dict[str, Any]) -> None:
        data = {k: event[k] for k in ("step", "total_steps", "epoch", "train_loss", "valid_loss") if k in event}
        if "train_accuracy" in event:
            data["train_mean_token_accuracy"] = event["train_accuracy"]
        message = f"Step {event.get('step')}/{event.get('total_steps')}: training loss={event.get('train_loss'):.4f}"
        if event.get("valid_loss") is not None:
            message += f", validation loss={event['valid_loss']:.4f}"
        await self._event(job_id, message, kind="metrics", data=data)

    async def _checkpoint(self, job: JobRow, event: dict[str, Any]) -> None:
        folder: Path = event["folder"]
        checkpoint_id = f"ftckpt-{uuid.uuid4().hex[:24]}"
        key = checkpoint_blob_key(job.id, checkpoint_id)
        with tempfile.NamedTemporaryFile(dir=self.work_dir, suffix=".tar") as archive:
            archive.write(await asyncio.to_thread(pack, folder))
            archive.flush()
            await asyncio.to_thread(self.files.blobs.put, key, Path(archive.name))
        metrics = {"step": event.get("step"), "train_loss": event.get("train_loss")}
        if event.get("valid_loss") is not None:
            metrics["valid_loss"] = event["valid_loss"]
        row = CheckpointRow(checkpoint_id, job.id, int(event["step"]), int(event["epoch"]), metrics, key, time.time())
        try:
            await asyncio.to_thread(self.records.add_checkpoint, row)
        except JobGone:
            with contextlib.suppress(Unavailable):  # else the store sweep removes it
                await asyncio.to_thread(self.files.blobs.delete, key)
            raise
        await self._event(job.id, f"Checkpoint created at step {event['step']} (epoch {event['epoch']})")

    async def _register(self, job: JobRow, result: dict[str, Any]) -> None:
        name = job.request["fine_tuned_model"]
        adapter_dir: Path = result["folder"]
        # Registered only while the job's row is there: its tenant may have been deleted meanwhile.
        await self.registry.add_folder(
            job.owner,
            name,
            lambda staging: copy_folder(adapter_dir, staging, self.max_adapter_bytes),
            guard=self.records.running_job_guard(job.id),
        )
        results = await self._results_file(job, result["metrics"])
        await self._event(job.id, f"New fine-tuned model created: {name}")
        done = await asyncio.to_thread(
            self.records.update_job,
            job.id,
            only_if=(RUNNING,),
            status="succeeded",
            fine_tuned_model=name,
            result_files=[results.id],
            trained_tokens=result.get("trained_tokens"),
            finished_at=time.time(),
        )
        if done:
            self._count("succeeded")
            await self._event(job.id, "The job has successfully completed")
        logger.info("fine-tuning job %s succeeded: %s", job.id, name)

    async def _results_file(self, job: JobRow, metrics: list[dict[str, Any]]) -> FileRow:
        """OpenAI's result file: one CSV row per step."""
        columns = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(columns)
        for event in metrics:
            writer.writerow(["" if event.get(c) is None else event[c] for c in columns])
        return await self.files.add(job.owner, "step_metrics.csv", RESULTS, text.getvalue().encode(), {"job": job.id})

    # -- endings -------------------------------------------------------------------------------

    async def _finish_failed(self, job_id: str, code: str, message: str, only_if: tuple[str, ...] | None = None):
        only_if = only_if or (VALIDATING, QUEUED, RUNNING)
        error = {"code": code, "message": message, "param": None}
        if await asyncio.to_thread(
            self.records.update_job, job_id, only_if=only_if, status="failed", error=error, finished_at=time.time()
        ):
            self._count("failed")
            with contextlib.suppress(JobGone):  # deleted with its tenant just now
                await self._event(job_id, f"The job failed: {message}", level="error")
            logger.warning("fine-tuning job %s failed: %s", job_id, message)

    async def _finish_cancelled(self, job_id: str) -> None:
        if await asyncio.to_thread(
            self.records.update_job, job_id, only_if=(RUNNING,), status="cancelled", finished_at=time.time()
        ):
            self._count("cancelled")
            with contextlib.suppress(JobGone):
                await self._event(job_id, "The job was cancelled")

    def _count(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.fine_tuning_jobs.labels(status).inc()

    async def _event(self, job_id: str, message: str, *, level: str = "info", kind: str = "message", data=None):
        await asyncio.to_thread(self.records.add_event, new_event(job_id, message, level=level, kind=kind, data=data))


@dataclass
class _Clock:
    """When a job started, and the limit it ran past (None while within it)."""

    started: float
    expired: float | None = None


def _time_limit_message(job_id: str, limit: float) -> str:
    return (
        f"the job ran past its time limit of {limit:g} seconds and was stopped; the checkpoints it saved are kept "
        f"(GET /v1/fine_tuning/jobs/{job_id}/checkpoints). Train on less data or for fewer epochs, or ask the "
        "admin to raise the tenant's max_training_seconds limit (default --max-training-seconds)"
    )

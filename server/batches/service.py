"""Batches in one gateway: create, read, list and cancel them; the runner, made from the settings."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

from adapters.batches_db import (
    CANCELLED,
    CANCELLING,
    IN_PROGRESS,
    VALIDATING,
    BatchQuotaExceeded,
    BatchRecords,
    BatchRow,
)
from adapters.fine_tuning_db import Page
from server.batches.protocol import BATCH, COMPLETION_WINDOW, WINDOW_SECONDS, CreateBatch, summarize_batch_file
from server.batches.runner import BatchRunner
from server.config import Settings
from server.finetune.files import TrainingFiles
from server.finetune.service import runner_id
from server.http.auth import Principal
from server.http.errors import GatewayError, InvalidRequest
from server.http.tenancy import RateLimited, Tenants
from server.openai.generation import Generator

QUOTA_RETRY_SECONDS = 30


class BatchNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "batch_not_found"

    def __init__(self, batch_id: str):
        super().__init__(f"No such Batch object: {batch_id[:64]}", param="batch_id")


@dataclass
class Batches:
    records: BatchRecords
    files: TrainingFiles
    tenants: Tenants
    runner: BatchRunner
    task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.runner.run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.runner.close()

    async def create(self, body: CreateBatch, principal: Principal) -> BatchRow:
        source = await self.files.get(body.input_file_id, principal, param="input_file_id")
        if source.purpose != BATCH:
            raise InvalidRequest(
                f"file {source.id} was uploaded with purpose={source.purpose}; a batch reads a file uploaded "
                "with purpose=batch",
                param="input_file_id",
            )
        if source.summary.get("endpoint") != body.endpoint:
            raise InvalidRequest(
                f"the lines of file {source.id} are for {source.summary.get('endpoint')}, and this batch's "
                f"endpoint is {body.endpoint}; they must be the same",
                param="endpoint",
            )
        owner = principal.owner
        if principal.tenant is not None:
            limits = self.tenants.limits(principal.tenant)
            max_batches, max_lines = limits.max_queued_batches, limits.max_batch_lines
        else:
            max_batches = max_lines = 2**62  # the admin's own batches are not limited
        now = time.time()
        row = BatchRow(
            id=f"batch_{uuid.uuid4().hex}",
            owner=owner,
            endpoint=body.endpoint,
            input_file_id=source.id,
            completion_window=COMPLETION_WINDOW,
            status=VALIDATING,
            total=int(source.summary["lines"]),
            created_at=now,
            expires_at=now + WINDOW_SECONDS,
            metadata=body.metadata,
        )
        try:
            await asyncio.to_thread(self.records.add, row, max_batches, max_lines)
        except BatchQuotaExceeded as exc:
            raise RateLimited(exc.message, QUOTA_RETRY_SECONDS) from None
        self.runner.poke()
        return row

    async def get(self, batch_id: str, principal: Principal) -> BatchRow:
        row = await asyncio.to_thread(self.records.get, batch_id)
        if row is None or not (principal.admin or row.owner == principal.owner):
            raise BatchNotFound(batch_id)
        return row

    async def list(self, principal: Principal, after: str | None, limit: int) -> Page:
        owner = None if principal.admin else principal.owner
        return await asyncio.to_thread(self.records.list, owner, after, limit)

    async def request_cancel(self, row: BatchRow) -> None:
        """A batch not started yet is cancelled now; one running is told to stop (`cancelling`)."""
        if not await asyncio.to_thread(self.records.finish, row.id, CANCELLED, only_if=(VALIDATING,)):
            await asyncio.to_thread(self.records.set_status, row.id, CANCELLING, only_if=(IN_PROGRESS,))


def open_batches(settings: Settings, files: TrainingFiles, tenants: Tenants, generator: Generator, app: Any) -> Batches:
    """The batches of this gateway's catalog, and the runner that runs its share of them."""
    registry = generator.registry
    assert registry.catalog is not None
    records = BatchRecords(registry.catalog)
    work_dir = settings.state_dir / "batches"
    work_dir.mkdir(parents=True, exist_ok=True)
    files.validators[BATCH] = partial(
        summarize_batch_file, max_lines=settings.batch_max_lines, max_line_bytes=settings.max_body_bytes
    )
    runner = BatchRunner(
        records,
        files,
        generator,
        app=app,
        runner_id=runner_id(settings.state_dir),
        work_dir=work_dir,
        max_running=settings.batch_max_running,
        lines_in_flight=settings.batch_lines_in_flight,
        lines_per_batch=settings.batch_lines_per_batch,
        yield_below=settings.batch_yield_below,
        max_lines=settings.batch_max_lines,
        max_line_bytes=settings.max_body_bytes,
    )
    return Batches(records, files, tenants, runner)

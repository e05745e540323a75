"""The catalog's fine-tuning tables: uploaded files, jobs, their events and checkpoints, and their SQL.

They live in the same database as the adapters (`adapters/database.py`), so every gateway of one
catalog sees every job: any of them answers for a job, and one of them runs it. A job is claimed
with a conditional UPDATE, so two gateways never run the same job; the one running it writes a
heartbeat, which is how the others tell a job whose gateway died.

These writes do not bump the catalog's change counter: nothing here is served from memory, so
other gateways need not reload their snapshot for them.

A file or job is written only while its owner exists (`Database.hold_owner`), and an event or
checkpoint only while its job does (JobGone): a tenant deleted meanwhile (adapters/retention.py)
leaves nothing behind for a new tenant of the same name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from adapters.database import CatalogTables, WriteGuard, metadata
from adapters.errors import JobGone, QuotaExceeded, StorageQuotaExceeded

files_table = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("filename", sa.Text, nullable=False),
    sa.Column("purpose", sa.Text, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("content_hash", sa.Text, nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

jobs_table = sa.Table(
    "fine_tuning_jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("base_fingerprint", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("fine_tuned_model", sa.Text, nullable=True),
    sa.Column("result_files", sa.Text, nullable=False, server_default="[]"),
    sa.Column("trained_tokens", sa.BigInteger, nullable=True),
    sa.Column("runner", sa.Text, nullable=True),
    sa.Column("heartbeat_at", sa.Double, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=True),
    sa.Column("finished_at", sa.Double, nullable=True),
)

events_table = sa.Table(
    "fine_tuning_events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.Text, nullable=False, unique=True),
    sa.Column("job_id", sa.Text, sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("level", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=True),
)

checkpoints_table = sa.Table(
    "fine_tuning_checkpoints",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("job_id", sa.Text, sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("blob_key", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

QUEUED, RUNNING = "queued", "running"
DONE = ("succeeded", "failed", "cancelled")

# Where the bytes are, in the store's backend: a file's under its id, a checkpoint's as its row says.
FILE_PREFIX, CHECKPOINT_PREFIX = "files/", "checkpoints/"


def file_blob_key(file_id: str) -> str:
    return f"{FILE_PREFIX}{file_id}"


def checkpoint_blob_key(job_id: str, checkpoint_id: str) -> str:
    return f"{CHECKPOINT_PREFIX}{job_id}/{checkpoint_id}.tar"


@dataclass(frozen=True)
class FileRow:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    content_hash: str
    summary: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class JobRow:
    id: str
    owner: str
    model: str
    status: str
    request: dict[str, Any]
    created_at: float
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    result_files: list[str] = field(default_factory=list)
    trained_tokens: int | None = None
    runner: str | None = None
    heartbeat_at: float | None = None
    cancel_requested: bool = False
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True)
class EventRow:
    id: str
    job_id: str
    created_at: float
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class CheckpointRow:
    id: str
    job_id: str
    step: int
    epoch: int
    metrics: dict[str, Any]
    blob_key: str
    created_at: float


@dataclass(frozen=True)
class Page:
    """One page of a list, newest first, and whether older rows follow."""

    rows: list
    has_more: bool


class FineTuningRecords(CatalogTables):
    """Files and fine-tuning jobs in the catalog database."""

    @contextmanager
    def _job_exists(self, job_id: str) -> Iterator[None]:
        """A row that names its job by foreign key; the key is missing once the job was deleted."""
        try:
            yield
        except sa.exc.IntegrityError:
            raise JobGone(job_id) from None

    # -- files ---------------------------------------------------------------------------------

    def add_file(self, row: FileRow, max_bytes: int | None = None) -> None:
        """A file's row; with `max_bytes`, refused (StorageQuotaExceeded) when the owner's files,
        this one among them, would pass it: the sum is taken in the insert's transaction."""
        values = {k: getattr(row, k) for k in ("id", "owner", "filename", "purpose", "bytes", "content_hash")}
        with self._write() as conn:
            if max_bytes is not None:
                self.catalog.lock_owner(conn, row.owner)
            # The insert first: on SQLite it takes the write lock before the owner is read.
            conn.execute(
                files_table.insert().values(**values, summary=json.dumps(row.summary), created_at=row.created_at)
            )
            self.catalog.hold_owner(conn, row.owner)
            if max_bytes is not None:
                kept = conn.execute(self._file_bytes_query(row.owner)).scalar_one()
                if kept > max_bytes:
                    raise StorageQuotaExceeded(
                        f"this tenant keeps {int(kept) - row.bytes} bytes of files and may keep {max_bytes}; "
                        "delete files first",
                        limit="max_file_bytes",
                    )

    def file(self, file_id: str) -> FileRow | None:
        rows = self._read(sa.select(files_table).where(files_table.c.id == file_id))
        return _file_row(rows[0]) if rows else None

    def files(self, owner: str | None, purpose: str | None, after: str | None, limit: int) -> Page:
        """An owner's files (None: everyone's), newest first, after the file `after`."""
        statement = sa.select(files_table)
        if owner is not None:
            statement = statement.where(files_table.c.owner == owner)
        if purpose is not None:
            statement = statement.where(files_table.c.purpose == purpose)
        return self._page(statement, files_table, after, limit, _file_row)

    def delete_file(self, file_id: str) -> bool:
        with self._write() as conn:
            return conn.execute(files_table.delete().where(files_table.c.id == file_id)).rowcount > 0

    def file_bytes(self, owner: str) -> int:
        return int(self._read(self._file_bytes_query(owner))[0][0])

    @staticmethod
    def _file_bytes_query(owner: str):
        return sa.select(sa.func.coalesce(sa.func.sum(files_table.c.bytes), 0)).where(files_table.c.owner == owner)

    def files_in_use(self, file_ids: set[str]) -> set[str]:
        """The files among `file_ids` that a job not yet done still needs."""
        rows = self._read(sa.select(jobs_table.c.request).where(jobs_table.c.status.not_in(DONE)))
        needed = set()
        for row in rows:
            request = json.loads(row.request)
            needed.update(f for f in (request.get("training_file"), request.get("validation_file")) if f)
        return needed & file_ids

    # -- jobs ----------------------------------------------------------------------------------

    def add_job(self, row: JobRow, max_waiting: int | None = None) -> None:
        """A job's row; with `max_waiting`, refused (QuotaExceeded) when the owner's waiting jobs,
        this one among them, would pass it: counted in the insert's transaction."""
        with self._write() as conn:
            if max_waiting is not None:
                self.catalog.lock_owner(conn, row.owner)
            conn.execute(
                jobs_table.insert().values(
                    id=row.id,
                    owner=row.owner,
                    base_fingerprint=self.base_fingerprint,
                    model=row.model,
                    status=row.status,
                    request=json.dumps(row.request),
                    created_at=row.created_at,
                )
            )
            self.catalog.hold_owner(conn, row.owner)
            if max_waiting is not None and conn.execute(self._waiting_query(row.owner)).scalar_one() > max_waiting:
                raise QuotaExceeded(
                    f"this tenant already has {max_waiting} fine-tuning jobs waiting; let one start first",
                    limit="max_queued_jobs",
                    retry_after=30,
                )

    def job(self, job_id: str) -> JobRow | None:
        rows = self._read(sa.select(jobs_table).where(jobs_table.c.id == job_id))
        return _job_row(rows[0]) if rows else None

    def jobs(self, owner: str | None, after: str | None, limit: int) -> Page:
        statement = sa.select(jobs_table)
        if owner is not None:
            statement = statement.where(jobs_table.c.owner == owner)
        return self._page(statement, jobs_table, after, limit, _job_row)

    def made_by_job(self, owner: str, fine_tuned_model: str) -> bool:
        """Whether one of the owner's fine-tuning jobs made the model of this name."""
        statement = sa.select(jobs_table.c.id).where(
            jobs_table.c.owner == owner, jobs_table.c.fine_tuned_model == fine_tuned_model
        )
        return bool(self._read(statement.limit(1)))

    def count_waiting(self, owner: str) -> int:
        """An owner's jobs that are not running yet: validating or queued."""
        return int(self._read(self._waiting_query(owner))[0][0])

    @staticmethod
    def _waiting_query(owner: str):
        return sa.select(sa.func.count()).where(
            jobs_table.c.owner == owner, jobs_table.c.status.in_(("validating_files", QUEUED))
        )

    def update_job(self, job_id: str, *, only_if: tuple[str, ...] | None = None, **values: Any) -> bool:
        """Set fields of a job; with `only_if`, only while its status is one of those. True if it changed."""
        for key in ("error", "result_files"):
            if key in values and values[key] is not None:
                values[key] = json.dumps(values[key])
        statement = jobs_table.update().where(jobs_table.c.id == job_id).values(**values)
        if only_if is not None:
            statement = statement.where(jobs_table.c.status.in_(only_if))
        with self._write() as conn:
            return conn.execute(statement).rowcount > 0

    def claim_next(self, runner: str) -> JobRow | None:
        """The next queued job of this base, now running here; None when none is queued.

        Tenants take turns (round robin): the next job is the oldest of the tenant whose last job
        started longest ago, or that never had one started. One tenant's long queue then waits
        behind one job of each other tenant, not behind all of theirs.
        """
        earlier = jobs_table.alias("earlier")
        last_started = (
            sa.select(sa.func.max(earlier.c.started_at)).where(earlier.c.owner == jobs_table.c.owner).scalar_subquery()
        )
        candidates = self._read(
            sa.select(jobs_table.c.id)
            .where(jobs_table.c.status == QUEUED, jobs_table.c.base_fingerprint == self.base_fingerprint)
            .order_by(sa.func.coalesce(last_started, 0.0), jobs_table.c.created_at)
            .limit(4)
        )
        now = time.time()
        for (job_id,) in candidates:
            # Another gateway may claim the same row at once; the conditional update picks one.
            if self.update_job(
                job_id, only_if=(QUEUED,), status=RUNNING, runner=runner, heartbeat_at=now, started_at=now
            ):
                return self.job(job_id)
        return None

    def running_job_guard(self, job_id: str) -> WriteGuard:
        """For `Database.put_adapter`: write only while the job is running, and keep it so until commit.

        A tenant's deletion deletes its jobs; a job that finishes a moment later must not register
        its adapter. The check is an UPDATE, so the job's row stays locked until the adapter's row
        is written (PostgreSQL), or the write lock is held already (SQLite).
        """

        def guard(conn: sa.Connection) -> None:
            running = (
                jobs_table.update()
                .where(jobs_table.c.id == job_id, jobs_table.c.status == RUNNING)
                .values(heartbeat_at=time.time())
            )
            if conn.execute(running).rowcount == 0:
                raise JobGone(job_id)

        return guard

    def running(self) -> list[JobRow]:
        return [_job_row(r) for r in self._read(sa.select(jobs_table).where(jobs_table.c.status == RUNNING))]

    def waiting_validation(self) -> list[JobRow]:
        statement = sa.select(jobs_table).where(
            jobs_table.c.status == "validating_files", jobs_table.c.base_fingerprint == self.base_fingerprint
        )
        return [_job_row(r) for r in self._read(statement)]

    # -- events and checkpoints ----------------------------------------------------------------

    def add_event(self, row: EventRow) -> None:
        """JobGone when the job was deleted (its tenant was)."""
        with self._job_exists(row.job_id), self._write() as conn:
            conn.execute(
                events_table.insert().values(
                    id=row.id,
                    job_id=row.job_id,
                    created_at=row.created_at,
                    level=row.level,
                    message=row.message,
                    type=row.type,
                    data=None if row.data is None else json.dumps(row.data),
                )
            )

    def events(self, job_id: str, after: str | None, limit: int) -> Page:
        """A job's events, newest first (as OpenAI lists them), older than the event `after`."""
        statement = sa.select(events_table).where(events_table.c.job_id == job_id)
        return self._page(statement, events_table, after, limit, _event_row, order=events_table.c.seq)

    def add_checkpoint(self, row: CheckpointRow) -> None:
        """JobGone when the job was deleted (its tenant was)."""
        with self._job_exists(row.job_id), self._write() as conn:
            conn.execute(
                checkpoints_table.insert().values(
                    id=row.id,
                    job_id=row.job_id,
                    step=row.step,
                    epoch=row.epoch,
                    metrics=json.dumps(row.metrics),
                    blob_key=row.blob_key,
                    created_at=row.created_at,
                )
            )

    def checkpoints(self, job_id: str, after: str | None, limit: int) -> Page:
        statement = sa.select(checkpoints_table).where(checkpoints_table.c.job_id == job_id)
        return self._page(statement, checkpoints_table, after, limit, _checkpoint_row, order=checkpoints_table.c.step)

    # -- plumbing ------------------------------------------------------------------------------

    def _page(self, statement, table: sa.Table, after: str | None, limit: int, to_row, order=None) -> Page:
        """Newest first; `after` is the id of the last row of the previous page."""
        order = order if order is not None else table.c.created_at
        if after is not None:
            cursor = sa.select(order).where(table.c.id == after).scalar_subquery()
            statement = statement.where(sa.or_(order < cursor, sa.and_(order == cursor, table.c.id < after)))
        rows = self._read(statement.order_by(order.desc(), table.c.id.desc()).limit(limit + 1))
        return Page([to_row(r) for r in rows[:limit]], len(rows) > limit)


def _file_row(r: sa.Row) -> FileRow:
    return FileRow(r.id, r.owner, r.filename, r.purpose, r.bytes, r.content_hash, json.loads(r.summary), r.created_at)


def _job_row(r: sa.Row) -> JobRow:
    return JobRow(
        id=r.id,
        owner=r.owner,
        model=r.model,
        status=r.status,
        request=json.loads(r.request),
        created_at=r.created_at,
        error=json.loads(r.error) if r.error else None,
        fine_tuned_model=r.fine_tuned_model,
        result_files=json.loads(r.result_files or "[]"),
        trained_tokens=r.trained_tokens,
        runner=r.runner,
        heartbeat_at=r.heartbeat_at,
        cancel_requested=bool(r.cancel_requested),
        started_at=r.started_at,
        finished_at=r.finished_at,
    )


def _event_row(r: sa.Row) -> EventRow:
    return EventRow(r.id, r.job_id, r.created_at, r.level, r.message, r.type, json.loads(r.data) if r.data else None)


def _checkpoint_row(r: sa.Row) -> CheckpointRow:
    return CheckpointRow(r.id, r.job_id, r.step, r.epoch, json.loads(r.metrics), r.blob_key, r.created_at)

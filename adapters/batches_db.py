"""The catalog's batch tables: batches, the results of their lines so far, and their SQL.

A batch lives in the same database as the files it reads and writes (adapters/fine_tuning_db.py),
so every gateway of one catalog answers for it, and one of them runs it: the runner claims it
with a conditional UPDATE and writes a heartbeat while it runs. A gateway that starts again
takes back the batches it was running; a batch whose heartbeat stops is taken over by another
gateway. Each line's result is kept as it finishes (`batch_lines`), in the transaction that
counts it, so a batch taken over runs only the lines not done yet. The output and error files
are written from those rows when the batch ends, and the rows are then deleted.

A batch is written only while its owner exists (`Database.hold_owner`), and a line's result only
while its batch does (BatchGone): a tenant deleted meanwhile (adapters/retention.py) leaves
nothing behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from adapters.database import CatalogTables, metadata
from adapters.errors import AdapterError
from adapters.fine_tuning_db import Page

batches_table = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("base_fingerprint", sa.Text, nullable=False),
    sa.Column("endpoint", sa.Text, nullable=False),
    sa.Column("input_file_id", sa.Text, nullable=False),
    sa.Column("completion_window", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("metadata", sa.Text, nullable=True),
    sa.Column("errors", sa.Text, nullable=True),
    sa.Column("output_file_id", sa.Text, nullable=True),
    sa.Column("error_file_id", sa.Text, nullable=True),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("runner", sa.Text, nullable=True),
    sa.Column("heartbeat_at", sa.Double, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("in_progress_at", sa.Double, nullable=True),
    sa.Column("finalizing_at", sa.Double, nullable=True),
    sa.Column("completed_at", sa.Double, nullable=True),
    sa.Column("failed_at", sa.Double, nullable=True),
    sa.Column("expired_at", sa.Double, nullable=True),
    sa.Column("cancelling_at", sa.Double, nullable=True),
    sa.Column("cancelled_at", sa.Double, nullable=True),
)

batch_lines_table = sa.Table(
    "batch_lines",
    metadata,
    sa.Column("batch_id", sa.Text, sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("result", sa.Text, nullable=False),
)

VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING = "validating", "in_progress", "finalizing", "cancelling"
COMPLETED, FAILED, EXPIRED, CANCELLED = "completed", "failed", "expired", "cancelled"
UNFINISHED = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)
FINISHED = (COMPLETED, FAILED, EXPIRED, CANCELLED)
TIMESTAMPS = {
    IN_PROGRESS: "in_progress_at",
    FINALIZING: "finalizing_at",
    COMPLETED: "completed_at",
    FAILED: "failed_at",
    EXPIRED: "expired_at",
    CANCELLING: "cancelling_at",
    CANCELLED: "cancelled_at",
}


class BatchGone(AdapterError):
    """A batch's row is gone (its tenant was deleted); whatever was being written for it is not kept."""

    def __init__(self, batch_id: str):
        super().__init__(f"batch {batch_id[:64]} no longer exists")


class BatchQuotaExceeded(AdapterError):
    """A tenant's unfinished batches, or their lines together, would pass its limit; nothing was written."""


@dataclass(frozen=True)
class BatchRow:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    total: int
    created_at: float
    expires_at: float
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    runner: str | None = None
    heartbeat_at: float | None = None
    times: dict[str, float] = field(default_factory=dict)  # in_progress_at, completed_at, ...


@dataclass(frozen=True)
class LineResult:
    line: int  # 1-based, as the input file's lines are numbered in messages
    ok: bool
    result: dict[str, Any]  # the output (or error) file's line


class BatchRecords(CatalogTables):
    """Batches and their lines' results in the catalog database."""

    def add(self, row: BatchRow, max_batches: int, max_lines: int) -> None:
        """Insert a batch while its owner exists and stays within its limits, all in one transaction.

        The counts are read after the insert, so two batches made at once by one tenant cannot
        both slip under a limit: on SQLite the insert's write lock orders them, on PostgreSQL the
        owner's row lock (`lock_owner`), as for files and jobs.
        """
        with self._write() as conn:
            self.catalog.lock_owner(conn, row.owner)
            # The insert first: on SQLite it takes the write lock before the owner is read.
            conn.execute(
                batches_table.insert().values(
                    id=row.id,
                    owner=row.owner,
                    base_fingerprint=self.base_fingerprint,
                    endpoint=row.endpoint,
                    input_file_id=row.input_file_id,
                    completion_window=row.completion_window,
                    status=row.status,
                    metadata=None if row.metadata is None else json.dumps(row.metadata),
                    total=row.total,
                    created_at=row.created_at,
                    expires_at=row.expires_at,
                )
            )
            self.catalog.hold_owner(conn, row.owner)
            batches, lines = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(batches_table.c.total), 0)).where(
                    batches_table.c.owner == row.owner, batches_table.c.status.in_(UNFINISHED)
                )
            ).one()
            if batches > max_batches:
                raise BatchQuotaExceeded(
                    f"this tenant has {batches - 1} batches not finished and may have {max_batches} "
                    "(max_queued_batches); wait for one to end or cancel one"
                )
            if lines > max_lines:
                raise BatchQuotaExceeded(
                    f"this batch's {row.total} lines and the {lines - row.total} of this tenant's unfinished "
                    f"batches pass its limit of {max_lines} lines (max_batch_lines); wait, or send fewer lines"
                )

    def get(self, batch_id: str) -> BatchRow | None:
        rows = self._read(sa.select(batches_table).where(batches_table.c.id == batch_id))
        return _batch_row(rows[0]) if rows else None

    def list(self, owner: str | None, after: str | None, limit: int) -> Page:
        """An owner's batches (None: everyone's), newest first, after the batch `after`."""
        statement = sa.select(batches_table)
        if owner is not None:
            statement = statement.where(batches_table.c.owner == owner)
        table = batches_table
        if after is not None:
            cursor = sa.select(table.c.created_at).where(table.c.id == after).scalar_subquery()
            statement = statement.where(
                sa.or_(table.c.created_at < cursor, sa.and_(table.c.created_at == cursor, table.c.id < after))
            )
        rows = self._read(statement.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit + 1))
        return Page([_batch_row(r) for r in rows[:limit]], len(rows) > limit)

    def set_status(self, batch_id: str, status: str, *, only_if: tuple[str, ...], **values: Any) -> bool:
        """Move a batch to `status` (stamping its time) while it is in one of `only_if`; True if it moved."""
        if "errors" in values and values["errors"] is not None:
            values["errors"] = json.dumps(values["errors"])
        if status in TIMESTAMPS:
            values.setdefault(TIMESTAMPS[status], time.time())
        statement = (
            batches_table.update()
            .where(batches_table.c.id == batch_id, batches_table.c.status.in_(only_if))
            .values(status=status, **values)
        )
        with self._write() as conn:
            return conn.execute(statement).rowcount > 0

    def claim(self, runner: str, stale_before: float, running_here: set[str]) -> BatchRow | None:
        """The oldest batch of this base that needs a runner, now run here; None when there is none.

        That is a batch not started yet, one this gateway ran before it restarted, or one whose
        runner's heartbeat stopped before `stale_before`. Two gateways may claim the same row at
        once; the conditional update picks one.
        """
        table = batches_table
        needs_runner = sa.or_(
            table.c.status == VALIDATING,
            table.c.runner == runner,
            table.c.heartbeat_at.is_(None),
            table.c.heartbeat_at < stale_before,
        )
        candidates = self._read(
            sa.select(table.c.id, table.c.status)
            .where(table.c.status.in_(UNFINISHED), table.c.base_fingerprint == self.base_fingerprint, needs_runner)
            .where(table.c.id.not_in(running_here) if running_here else sa.true())
            .order_by(table.c.created_at)
            .limit(4)
        )
        now = time.time()
        for batch_id, status in candidates:
            values: dict[str, Any] = {"runner": runner, "heartbeat_at": now}
            if status == VALIDATING:
                values |= {"status": IN_PROGRESS, "in_progress_at": now}
            statement = table.update().where(table.c.id == batch_id, table.c.status == status, needs_runner)
            with self._write() as conn:
                claimed = conn.execute(statement.values(**values)).rowcount > 0
            if claimed:  # read once committed
                return self.get(batch_id)
        return None

    def heartbeat(self, batch_id: str, runner: str) -> BatchRow | None:
        """Beat for a batch this runner holds; its row as it is now, or None once it is gone or not ours."""
        statement = (
            batches_table.update()
            .where(batches_table.c.id == batch_id, batches_table.c.runner == runner)
            .values(heartbeat_at=time.time())
        )
        with self._write() as conn:
            if conn.execute(statement).rowcount == 0:
                return None
        return self.get(batch_id)

    def record_line(self, batch_id: str, result: LineResult) -> None:
        """Keep one line's result and count it, in one transaction; BatchGone once the batch is."""
        counter = batches_table.c.completed if result.ok else batches_table.c.failed
        with self._write() as conn:
            counted = conn.execute(
                batches_table.update()
                .where(batches_table.c.id == batch_id, batches_table.c.status.in_(UNFINISHED))
                .values({counter: counter + 1})
            )
            if counted.rowcount == 0:
                raise BatchGone(batch_id)
            conn.execute(
                batch_lines_table.insert().values(
                    batch_id=batch_id, line=result.line, ok=result.ok, result=json.dumps(result.result)
                )
            )

    def record_line_once(self, batch_id: str, result: LineResult) -> bool:
        """record_line, unless the line was recorded already (by a runner this one took over from)."""
        try:
            self.record_line(batch_id, result)
        except sa.exc.IntegrityError:
            return False
        return True

    def done_lines(self, batch_id: str) -> set[int]:
        statement = sa.select(batch_lines_table.c.line).where(batch_lines_table.c.batch_id == batch_id)
        return {row.line for row in self._read(statement)}

    def results(self, batch_id: str) -> list[LineResult]:
        """Every line's result so far, in the input file's order."""
        statement = (
            sa.select(batch_lines_table)
            .where(batch_lines_table.c.batch_id == batch_id)
            .order_by(batch_lines_table.c.line)
        )
        return [LineResult(r.line, bool(r.ok), json.loads(r.result)) for r in self._read(statement)]

    def finish(self, batch_id: str, status: str, *, only_if: tuple[str, ...], **values: Any) -> bool:
        """End a batch (its files written) and drop its lines' rows, in one transaction."""
        if "errors" in values and values["errors"] is not None:
            values["errors"] = json.dumps(values["errors"])
        values.setdefault(TIMESTAMPS[status], time.time())
        with self._write() as conn:
            moved = conn.execute(
                batches_table.update()
                .where(batches_table.c.id == batch_id, batches_table.c.status.in_(only_if))
                .values(status=status, runner=None, **values)
            )
            if moved.rowcount == 0:
                return False
            conn.execute(batch_lines_table.delete().where(batch_lines_table.c.batch_id == batch_id))
        return True

    def files_in_use(self, file_ids: set[str]) -> set[str]:
        """The input files among `file_ids` that a batch not yet finished still reads."""
        statement = sa.select(batches_table.c.input_file_id).where(
            batches_table.c.status.in_(UNFINISHED), batches_table.c.input_file_id.in_(file_ids)
        )
        return {row.input_file_id for row in self._read(statement)}


def _batch_row(r: sa.Row) -> BatchRow:
    return BatchRow(
        id=r.id,
        owner=r.owner,
        endpoint=r.endpoint,
        input_file_id=r.input_file_id,
        completion_window=r.completion_window,
        status=r.status,
        total=r.total,
        created_at=r.created_at,
        expires_at=r.expires_at,
        metadata=json.loads(r.metadata) if r.metadata else None,
        errors=json.loads(r.errors) if r.errors else None,
        output_file_id=r.output_file_id,
        error_file_id=r.error_file_id,
        completed=r.completed,
        failed=r.failed,
        runner=r.runner,
        heartbeat_at=r.heartbeat_at,
        times={name: getattr(r, name) for name in TIMESTAMPS.values() if getattr(r, name) is not None},
    )

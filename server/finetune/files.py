"""Training files: OpenAI's files API for `purpose=fine-tune`, kept in the adapter store's backend.

A file's bytes go to the store's backend under `files/<id>` (so gateways sharing a store share
them), and its row to the catalog. JSONL is validated at upload, so a bad file is refused with
its line number before any job is made from it. A file belongs to the tenant that uploaded it;
another tenant's file answers 404, as a missing one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.blobs import BlobNotFound, Blobs
from adapters.errors import OwnerNotFound, StorageQuotaExceeded, StoreUnavailable
from adapters.fine_tuning_db import FileRow, FineTuningRecords, Page, file_blob_key
from adapters.quota import Reservations
from adapters.training.data import validate_training_file
from adapters.work import WorkPool
from server.http.auth import Principal
from server.http.errors import GatewayError, InvalidRequest

FINE_TUNE = "fine-tune"
RESULTS = "fine-tune-results"
MAX_FILENAME = 255


class FileNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "file_not_found"

    def __init__(self, file_id: str, param: str = "file_id"):
        super().__init__(f"No such File object: {file_id[:64]}", param=param)


class FileInUse(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "file_in_use"


class FileQuotaExceeded(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "file_too_large"


def file_card(row: FileRow) -> dict[str, Any]:
    """OpenAI's File object."""
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": int(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


class TrainingFiles:
    """Upload, list, read and delete files; every call checks the caller owns the file."""

    def __init__(self, records: FineTuningRecords, blobs: Blobs, scratch: Path, work: WorkPool | None = None):
        self.records = records
        self.blobs = blobs
        self.scratch = scratch
        self.work = work or WorkPool()
        self.reserved = Reservations()  # bytes of files being uploaded, per owner
        # Other uploadable purposes (batch, server/batches/) and how each checks its file, in a thread.
        self.validators: dict[str, Callable[[bytes], dict[str, Any]]] = {}

    async def upload(self, owner: str, filename: str, purpose: str, raw: bytes, quota_bytes: int | None) -> FileRow:
        """Validate and keep a file; `quota_bytes` bounds the owner's files together (None: no bound).

        The bytes are reserved before the file is validated, so uploads at once cannot together
        pass the quota, and the catalog sums them again as it writes the row (across gateways).
        """
        if purpose != FINE_TUNE and purpose not in self.validators:
            served = " or ".join(f"purpose={name}" for name in (FINE_TUNE, *self.validators))
            raise InvalidRequest(
                f"purpose '{purpose[:32]}' is not served here; upload with {served}",
                param="purpose",
            )

        def refuse(in_use: int) -> StorageQuotaExceeded:
            return StorageQuotaExceeded(
                f"this tenant keeps {in_use} bytes of files (uploads under way included) and may keep "
                f"{quota_bytes}; this one has {len(raw)}: delete files first",
                limit="max_file_bytes",
            )

        used = lambda: asyncio.to_thread(self.records.file_bytes, owner)  # noqa: E731
        async with self.reserved.hold(owner, len(raw), quota_bytes, used, refuse):
            if purpose != FINE_TUNE:
                described = await self.work.run(self.validators[purpose], raw)
                return await self.add(
                    owner, filename or f"{purpose}.jsonl", purpose, raw, described, max_bytes=quota_bytes
                )
            summary = await self.work.run(validate_training_file, raw)
            described = {"format": summary.format, "examples": summary.examples}
            return await self.add(owner, filename or "training.jsonl", purpose, raw, described, max_bytes=quota_bytes)

    async def add(
        self, owner: str, filename: str, purpose: str, raw: bytes, summary: dict[str, Any], max_bytes: int | None = None
    ) -> FileRow:
        """A new file: the bytes into the store, then the row, so a row never points at missing bytes.

        A row the catalog refuses (the owner was deleted meanwhile, or `max_bytes` would be
        passed) takes its bytes with it.
        """
        row = FileRow(
            id=f"file-{uuid.uuid4().hex[:24]}",
            owner=owner,
            filename=Path(filename).name[:MAX_FILENAME],
            purpose=purpose,
            bytes=len(raw),
            content_hash=hashlib.sha256(raw).hexdigest(),
            summary=summary,
            created_at=time.time(),
        )
        self.scratch.mkdir(parents=True, exist_ok=True)
        staged = self.scratch / f".{row.id}.upload"
        try:
            await asyncio.to_thread(staged.write_bytes, raw)
            await asyncio.to_thread(self.blobs.put, file_blob_key(row.id), staged)
        finally:
            staged.unlink(missing_ok=True)
        try:
            await asyncio.to_thread(self.records.add_file, row, max_bytes)
        except (OwnerNotFound, StorageQuotaExceeded):
            with contextlib.suppress(StoreUnavailable):  # else the store sweep removes them
                await asyncio.to_thread(self.blobs.delete, file_blob_key(row.id))
            raise
        return row

    async def get(self, file_id: str, principal: Principal, param: str = "file_id") -> FileRow:
        row = await asyncio.to_thread(self.records.file, file_id)
        if row is None or not (principal.admin or row.owner == principal.owner):
            raise FileNotFound(file_id, param)
        return row

    async def list(self, principal: Principal, purpose: str | None, after: str | None, limit: int) -> Page:
        owner = None if principal.admin else principal.owner
        return await asyncio.to_thread(self.records.files, owner, purpose, after, limit)

    async def content(self, row: FileRow) -> bytes:
        self.scratch.mkdir(parents=True, exist_ok=True)
        target = self.scratch / f".{row.id}.{uuid.uuid4().hex[:8]}.read"
        try:
            await self.fetch(row.id, target)
            return await asyncio.to_thread(target.read_bytes)
        finally:
            target.unlink(missing_ok=True)

    async def fetch(self, file_id: str, target: Path) -> None:
        try:
            await asyncio.to_thread(self.blobs.get, file_blob_key(file_id), target)
        except BlobNotFound:
            raise FileNotFound(file_id) from None

    async def delete(self, row: FileRow) -> None:
        in_use = await asyncio.to_thread(self.records.files_in_use, {row.id})
        if in_use:
            raise FileInUse(f"file {row.id} is used by a fine-tuning job that has not finished; cancel it first")
        await asyncio.to_thread(self.records.delete_file, row.id)
        await asyncio.to_thread(self.blobs.delete, file_blob_key(row.id))

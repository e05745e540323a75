"""Export: an adapter merged into the base model, written under --export-dir by a background job.

`POST /v1/adapters/{name}/export` (admin) queues a job and answers 202 with it; `GET
/v1/exports/{id}` tells how it goes: queued, running, succeeded or failed. Each job runs
`lora-gateway merge` (adapters/merge.py) in a process of its own, with one CPU thread, so that
serving keeps its cores, memory and GIL; jobs run one at a time. The folder is
`<name>-<first 12 hex digits of the adapter's content hash>`, so a second export of the same
files finds it done. Callers name the adapter, never a path, and see the folder's name only.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict

from adapters import confine
from adapters.errors import AdapterNotFound
from adapters.registry import AdapterEntry, Registry
from adapters.spec import SHARED
from server.admin.adapters import UnknownAdapter
from server.config import Settings
from server.http.deps import AdminDep, RegistryDep
from server.http.errors import GatewayError, InvalidRequest
from server.http.responses import JSONResponse

logger = logging.getLogger(__name__)

MAX_KEPT_JOBS = 100
STOP_SECONDS = 10.0
_OUTPUT_TAIL = 4000


class ExportsDisabled(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "exports_disabled"


class ExportNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "export_not_found"

    def __init__(self, job_id: str):
        super().__init__(f"no export job '{job_id[:64]}'", param="id")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


@dataclass
class ExportJob:
    """One merge of an adapter into the base model, and how it went."""

    id: str
    adapter: str
    content_hash: str
    folder: str
    dtype: str
    status: str = "queued"  # then running, and succeeded or failed
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed")

    def card(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "adapter.export",
            "adapter": self.adapter,
            "content_hash": "sha256:" + self.content_hash,
            "status": self.status,
            "folder": self.folder,
            "dtype": self.dtype,
            "error": self.error,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class ExportJobs:
    """Export jobs, run one at a time, each as a `lora-gateway merge` process."""

    def __init__(self, export_dir: Path, base_dir: Path, registry: Registry):
        self.export_dir = export_dir
        self.base_dir = base_dir
        self.registry = registry
        self._jobs: OrderedDict[str, ExportJob] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self._one_at_a_time = asyncio.Lock()
        self._running: asyncio.subprocess.Process | None = None

    def get(self, job_id: str) -> ExportJob:
        if (job := self._jobs.get(job_id)) is None:
            raise ExportNotFound(job_id)
        return job

    def jobs(self) -> list[ExportJob]:
        return list(self._jobs.values())

    def submit(self, entry: AdapterEntry, dtype: str) -> ExportJob:
        """A job for this adapter's files: one already queued or running, or done on disk, or new."""
        owner = f"{entry.owner}." if entry.owner != SHARED else ""
        folder = f"{owner}{entry.name}-{entry.spec.content_hash[:12]}" + ("" if dtype == "auto" else f"-{dtype}")
        for job in reversed(self._jobs.values()):
            if job.folder == folder and not job.done:
                return job
        job = ExportJob(f"export-{uuid.uuid4().hex[:16]}", entry.qualified_name, entry.spec.content_hash, folder, dtype)
        self._remember(job)
        if (self.export_dir / folder).is_dir():
            job.status, job.started_at, job.finished_at = "succeeded", job.created_at, job.created_at
            return job
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def _remember(self, job: ExportJob) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > MAX_KEPT_JOBS:
            oldest = next((j for j in self._jobs.values() if j.done), None)
            if oldest is None:
                break
            del self._jobs[oldest.id]

    async def _run(self, job: ExportJob) -> None:
        async with self._one_at_a_time:
            job.status, job.started_at = "running", time.time()
            try:
                await self._merge(job)
                job.status = "succeeded"
                logger.info("export %s of %s: %s written", job.id, job.adapter, job.folder)
            except asyncio.CancelledError:
                job.status, job.error = "failed", "the gateway stopped before the export finished"
                raise
            except Exception as exc:  # noqa: BLE001 - any failure ends this job only
                job.status = "failed"
                job.error = exc.args[0] if isinstance(exc, _MergeProcessFailed) else "the export could not be written"
                if not isinstance(exc, _MergeProcessFailed):
                    logger.exception("export %s of %s failed", job.id, job.adapter)
            finally:
                job.finished_at = time.time()
                for leftover in self.export_dir.glob(f".{job.folder}.*.partial"):
                    shutil.rmtree(leftover, ignore_errors=True)

    async def _merge(self, job: ExportJob) -> None:
        store = self.registry.store
        if store is None:
            raise RuntimeError("this registry has no store")
        adapter_dir = await asyncio.to_thread(store.ensure_local, job.content_hash)
        self.export_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "server",
            "merge",
            "--model",
            str(self.base_dir),
            "--adapter",
            str(adapter_dir),
            "--out",
            str(self.export_dir / job.folder),
            "--dtype",
            job.dtype,
            "--threads",
            "1",
        ]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=confine.parent_death_hook(),  # a merge holds a whole model: not past the gateway
        )
        self._running = process
        try:
            output, _ = await process.communicate()
        finally:
            self._running = None
            if process.returncode is None:
                await _stop(process)
        if process.returncode != 0:
            tail = output.decode(errors="replace")[-_OUTPUT_TAIL:]
            logger.warning("export %s of %s: merge exited with %s:\n%s", job.id, job.adapter, process.returncode, tail)
            raise _MergeProcessFailed(
                f"the merge process exited with status {process.returncode}; the gateway's log has its output"
            )

    async def close(self) -> None:
        """Stop a running merge and cancel the queue (at shutdown)."""
        if self._running is not None:
            await _stop(self._running)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _MergeProcessFailed(Exception):
    """The merge process failed; args[0] is safe to show (no paths)."""


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    jobs = None
    if settings.export_dir is not None:
        if (base_dir := settings.base_model_dir()) is not None:
            jobs = ExportJobs(settings.export_dir, base_dir, app.state.registry)
        else:
            logger.warning("--export-dir is set but the base model's folder is unknown; exports are off")
    app.state.exports = jobs
    try:
        yield
    finally:
        if jobs is not None:
            await jobs.close()


router = APIRouter(lifespan=lifespan)


async def get_exports(request: Request) -> ExportJobs:
    jobs = getattr(request.app.state, "exports", None)
    if jobs is None:
        raise ExportsDisabled("exports are off; start the gateway with --export-dir DIR to turn them on")
    return jobs


ExportsDep = Annotated[ExportJobs, Depends(get_exports)]


@router.post("/v1/adapters/{name:path}/export", status_code=202, response_model=None)
async def export_adapter(
    name: str, principal: AdminDep, registry: RegistryDep, exports: ExportsDep, body: ExportRequest | None = None
) -> JSONResponse:
    """Merge the adapter into the base model, in the background; poll GET /v1/exports/{id}."""
    try:
        entry = registry.resolve(name, tenant=None, admin=True)
    except AdapterNotFound:
        raise UnknownAdapter(name) from None
    if entry is registry.base:
        raise InvalidRequest(f"'{name}' is the base model itself; export an adapter", param="name")
    job = exports.submit(entry, (body or ExportRequest()).dtype)
    return JSONResponse(job.card(), status_code=202, headers={"Location": f"/v1/exports/{job.id}"})


@router.get("/v1/exports", response_model=None)
async def list_exports(principal: AdminDep, exports: ExportsDep) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [job.card() for job in exports.jobs()]})


@router.get("/v1/exports/{job_id}", response_model=None)
async def get_export(job_id: str, principal: AdminDep, exports: ExportsDep) -> JSONResponse:
    return JSONResponse(exports.get(job_id).card())

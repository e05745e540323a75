"""Fine-tuning in one gateway: the files, the jobs and the scheduler, made from the settings.

Files go to the adapter store's shared backend when there is one (--store-url), else to a folder
under --state-dir. The scheduler runs jobs in a process of its own, or as Ray tasks with --ray.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapters.blobs import Blobs, LocalBlobs
from adapters.fine_tuning_db import FineTuningRecords
from adapters.registry import Registry
from adapters.store import AdapterStore
from server.config import Settings
from server.finetune.files import TrainingFiles
from server.finetune.jobs import FineTuningJobs
from server.finetune.runners import ProcessRunner, RayRunner
from server.finetune.scheduler import SchedulerMetrics, TrainingScheduler
from server.http.tenancy import Tenants

logger = logging.getLogger(__name__)


@dataclass
class FineTuning:
    files: TrainingFiles
    jobs: FineTuningJobs
    scheduler: TrainingScheduler
    task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.scheduler.run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.scheduler.close()


def runner_id(state_dir: Path) -> str:
    """This gateway's name in the catalog's `runner` column, kept across restarts in --state-dir."""
    path = state_dir / "gateway-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = f"gateway-{uuid.uuid4().hex[:16]}"
        path.write_text(identity + "\n")
        return identity


def file_blobs(store: AdapterStore | None, state_dir: Path) -> Blobs:
    """Where files and checkpoints are kept: the store's shared backend, else files/ under --state-dir."""
    shared = store.blobs if store is not None else None
    if shared is not None:
        return shared
    root = state_dir / "files"
    root.mkdir(parents=True, exist_ok=True)
    return LocalBlobs(root)


def open_fine_tuning(
    settings: Settings, registry: Registry, tenants: Tenants, base_dir: Path, metrics: SchedulerMetrics | None = None
) -> FineTuning:
    assert registry.catalog is not None
    records = FineTuningRecords(registry.catalog)
    work_dir = settings.state_dir / "fine-tuning"
    work_dir.mkdir(parents=True, exist_ok=True)
    files = TrainingFiles(records, file_blobs(registry.store, settings.state_dir), work_dir, registry.work)
    jobs = FineTuningJobs(records, files, registry, tenants, base_dir, settings.max_lora_rank)
    if settings.ray:
        runner = RayRunner(settings.training_threads, settings.training_cpus)
    else:
        runner = ProcessRunner(settings.training_threads)
    scheduler = TrainingScheduler(
        records,
        files,
        registry,
        runner,
        base_dir=base_dir,
        work_dir=work_dir,
        runner_id=runner_id(settings.state_dir),
        max_jobs=settings.max_training_jobs,
        device=settings.training_device,
        threads=settings.training_threads,
        max_adapter_bytes=settings.max_adapter_bytes,
        max_length=settings.max_model_len or 1024,
        metrics=metrics,
        time_limit=lambda owner: _training_seconds(tenants, owner, settings.max_training_seconds),
    )
    return FineTuning(files, jobs, scheduler)


def _training_seconds(tenants: Tenants, owner: str, default: float) -> float:
    """The wall-clock limit of a job of `owner`: its tenant's limit, else --max-training-seconds."""
    return tenants.limits(owner).max_training_seconds if tenants.exists(owner) else default

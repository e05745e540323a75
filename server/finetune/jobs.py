"""Fine-tuning jobs in OpenAI's shapes: create, list, retrieve, cancel, events and checkpoints.

A job is a row in the catalog. It starts as `validating_files`; the scheduler
(`server/finetune/scheduler.py`) checks its files and queues it, then one gateway claims and runs
it. Everything here reads and writes the catalog only, so any gateway of one catalog answers for
any job. Another tenant's job answers 404, as a missing one does.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.errors import AdapterNotFound
from adapters.fine_tuning_db import DONE, EventRow, FineTuningRecords, JobRow, Page
from adapters.registry import Registry
from adapters.training.hyperparams import resolve_hyperparameters
from adapters.training.lora_settings import resolve_lora_settings
from adapters.validate import NAME_PATTERN
from server.finetune.files import FINE_TUNE, TrainingFiles
from server.http.auth import Principal
from server.http.bodies import metadata_problem
from server.http.errors import GatewayError, InvalidRequest, ModelNotFound, UnsupportedParameter
from server.http.tenancy import Tenants

VALIDATING = "validating_files"
SUFFIX_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


class JobNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "fine_tuning_job_not_found"

    def __init__(self, job_id: str):
        super().__init__(f"No such fine-tuning job: {job_id[:64]}", param="fine_tuning_job_id")


class JobAlreadyDone(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "job_already_done"


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: dict[str, Any] | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class CreateJob(BaseModel):
    """OpenAI's job create body, and `lora` (PEFT's LoraConfig fields) as this gateway's extension."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: dict[str, Any] | None = None  # OpenAI's older place for them
    method: Method | None = None
    integrations: list[Any] | None = None
    lora: dict[str, Any] | None = None


def fine_tuned_name(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's pattern, `ft:<base>:<suffix>:<id>`, with the job id's last 8 characters."""
    return f"ft:{base}:{suffix or ''}:{job_id[-8:]}"


def job_card(row: JobRow) -> dict[str, Any]:
    """OpenAI's FineTuningJob object, with the LoRA settings it trains with."""
    request = row.request
    hyperparameters = {k: request["hyperparameters"][k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return {
        "id": row.id,
        "object": "fine_tuning.job",
        "created_at": int(row.created_at),
        "error": row.error,
        "fine_tuned_model": row.fine_tuned_model,
        "finished_at": None if row.finished_at is None else int(row.finished_at),
        "hyperparameters": hyperparameters,
        "model": row.model,
        "organization_id": row.owner,
        "result_files": row.result_files,
        "seed": request["seed"],
        "status": row.status,
        "trained_tokens": row.trained_tokens,
        "training_file": request["training_file"],
        "validation_file": request.get("validation_file"),
        "estimated_finish": None,
        "integrations": [],
        "metadata": request.get("metadata"),
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "user_provided_suffix": request.get("suffix"),
        "lora": request["lora"],
    }


def event_card(row: EventRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "fine_tuning.job.event",
        "created_at": int(row.created_at),
        "level": row.level,
        "message": row.message,
        "type": row.type,
        "data": row.data,
    }


def new_event(job_id: str, message: str, *, level: str = "info", kind: str = "message", data=None) -> EventRow:
    return EventRow(f"ftevent-{uuid.uuid4().hex[:24]}", job_id, time.time(), level, message, kind, data)


class FineTuningJobs:
    """The jobs API over the catalog."""

    def __init__(
        self,
        records: FineTuningRecords,
        files: TrainingFiles,
        registry: Registry,
        tenants: Tenants,
        base_dir: Path,
        max_lora_rank: int,
    ):
        self.records = records
        self.files = files
        self.registry = registry
        self.tenants = tenants
        self.base_dir = base_dir
        self.max_lora_rank = max_lora_rank
        config = json.loads((base_dir / "config.json").read_text())
        self.hidden_size = config.get("hidden_size")

    async def create(self, body: CreateJob, principal: Principal) -> JobRow:
        if body.integrations:
            raise UnsupportedParameter("integrations")
        supervised = self._supervised(body)
        base = self.registry.base_name
        if body.model != base:
            if self._is_visible_adapter(body.model, principal):
                raise InvalidRequest(
                    f"fine-tune the base model '{base}'; training on top of an adapter is not supported here",
                    param="model",
                )
            raise ModelNotFound(body.model)
        training = await self.files.get(body.training_file, principal, param="training_file")
        validation = None
        if body.validation_file is not None:
            validation = await self.files.get(body.validation_file, principal, param="validation_file")
        for row, param in ((training, "training_file"), (validation, "validation_file")):
            if row is not None and row.purpose != FINE_TUNE:
                raise InvalidRequest(f"file {row.id} was not uploaded with purpose=fine-tune", param=param)
        self._check_metadata(body.metadata)
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        if body.suffix is not None and not SUFFIX_PATTERN.fullmatch(body.suffix):
            raise InvalidRequest("suffix takes letters, digits, '.', '_' and '-'", param="suffix")
        name = fine_tuned_name(base, body.suffix, job_id)
        if not NAME_PATTERN.match(name):
            room = 64 - len(fine_tuned_name(base, "", job_id))
            raise InvalidRequest(
                f"suffix is too long for this base model: at most {max(room, 0)} characters", param="suffix"
            )
        hyperparameters = resolve_hyperparameters(
            supervised, examples=int(training.summary["examples"]), hidden_size=self.hidden_size
        )
        lora = await asyncio.to_thread(resolve_lora_settings, body.lora, self.base_dir, self.max_lora_rank)
        owner = principal.owner
        limit = self.tenants.limits(owner).max_queued_jobs if principal.tenant else None
        request = {
            "training_file": training.id,
            "validation_file": None if validation is None else validation.id,
            "suffix": body.suffix,
            "seed": body.seed if body.seed is not None else random.randrange(2**31),
            "metadata": body.metadata,
            "hyperparameters": hyperparameters.to_dict(),
            "lora": lora.to_dict(),
            "fine_tuned_model": name,
        }
        row = JobRow(job_id, owner, base, VALIDATING, request, time.time())
        # The catalog counts the tenant's waiting jobs in the insert's transaction: one check, one write.
        await asyncio.to_thread(self.records.add_job, row, limit)
        await asyncio.to_thread(self.records.add_event, new_event(job_id, f"Validating training file: {training.id}"))
        return row

    def _supervised(self, body: CreateJob) -> dict[str, Any] | None:
        if body.method is None:
            return body.hyperparameters
        if body.method.type != "supervised":
            raise InvalidRequest(
                f"method '{body.method.type}' is not offered here; use supervised", param="method.type"
            )
        if body.hyperparameters is not None and body.method.supervised is not None:
            raise InvalidRequest(
                "give hyperparameters in method.supervised.hyperparameters only", param="hyperparameters"
            )
        if body.method.supervised is not None:
            return body.method.supervised.hyperparameters
        return body.hyperparameters

    def _is_visible_adapter(self, name: str, principal: Principal) -> bool:
        try:
            self.registry.resolve(name, tenant=principal.tenant, admin=principal.admin)
        except AdapterNotFound:  # missing or another tenant's: the caller sees a 404 either way
            return False
        return True

    @staticmethod
    def _check_metadata(metadata: dict[str, str] | None) -> None:
        if problem := metadata_problem(metadata):
            raise InvalidRequest(problem, param="metadata")

    async def get(self, job_id: str, principal: Principal) -> JobRow:
        row = await asyncio.to_thread(self.records.job, job_id)
        if row is None or not (principal.admin or row.owner == principal.owner):
            raise JobNotFound(job_id)
        return row

    async def list(self, principal: Principal, after: str | None, limit: int) -> Page:
        owner = None if principal.admin else principal.owner
        return await asyncio.to_thread(self.records.jobs, owner, after, limit)

    async def request_cancel(self, row: JobRow) -> JobRow:
        """Cancel a job that has not started at once; ask the gateway running one to stop it."""
        if row.status in DONE:
            raise JobAlreadyDone(f"job {row.id} has already {row.status}")
        now = time.time()
        waiting = (VALIDATING, "queued")
        if await asyncio.to_thread(
            self.records.update_job, row.id, only_if=waiting, status="cancelled", finished_at=now
        ):
            await asyncio.to_thread(self.records.add_event, new_event(row.id, "The job was cancelled"))
        else:
            await asyncio.to_thread(self.records.update_job, row.id, cancel_requested=True)
        return await asyncio.to_thread(self.records.job, row.id) or row

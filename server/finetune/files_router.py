"""OpenAI's files API, for training data and batches: upload (multipart, purpose=fine-tune or
batch), list, get, delete and content. A tenant sees its own files only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile
from starlette.responses import Response

from server.admin.adapters import LengthRequired
from server.config import Settings
from server.finetune.files import FileQuotaExceeded, file_card
from server.finetune.jobs_router import FineTuningDep, list_body
from server.finetune.service import FineTuning
from server.http.auth import Principal
from server.http.deps import PrincipalDep, SettingsDep, TenantsDep
from server.http.errors import InvalidRequest
from server.http.responses import JSONResponse
from server.http.tenancy import Tenants

router = APIRouter()


@router.post("/v1/files", response_model=None)
async def upload_file(
    request: Request, fine_tuning: FineTuningDep, principal: PrincipalDep, tenants: TenantsDep, settings: SettingsDep
) -> JSONResponse:
    """Upload a training file; the tenant's rate and concurrency are counted before the body is read."""
    with tenants.admitted(principal.tenant):
        return await _upload_file(request, fine_tuning, principal, tenants, settings)


async def _upload_file(
    request: Request, fine_tuning: FineTuning, principal: Principal, tenants: Tenants, settings: Settings
) -> JSONResponse:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("send multipart/form-data with 'file' and 'purpose'")
    # BodyLimitMiddleware has refused a declared length over --max-file-bytes already.
    if request.headers.get("content-length") is None:
        raise LengthRequired("uploads need a Content-Length header")
    limit = settings.max_file_bytes
    form = await request.form(max_files=1, max_fields=4)
    try:
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise InvalidRequest("the form needs a 'purpose' field: fine-tune or batch", param="purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("the form needs a 'file' field with the JSONL training data", param="file")
        raw = await upload.read(limit + 1)
        filename = upload.filename or "training.jsonl"
    finally:
        await form.close()
    if len(raw) > limit:
        raise FileQuotaExceeded(f"the file is over the {limit}-byte limit (--max-file-bytes)")
    quota = tenants.limits(principal.tenant).max_file_bytes if principal.tenant else None
    row = await fine_tuning.files.upload(principal.owner, filename, purpose, raw, quota)
    return JSONResponse(file_card(row))


@router.get("/v1/files", response_model=None)
async def list_files(
    fine_tuning: FineTuningDep,
    principal: PrincipalDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
) -> JSONResponse:
    page = await fine_tuning.files.list(principal, purpose, after, limit)
    return JSONResponse(list_body(page, file_card))


@router.get("/v1/files/{file_id}", response_model=None)
async def get_file(file_id: str, fine_tuning: FineTuningDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(file_card(await fine_tuning.files.get(file_id, principal)))


@router.delete("/v1/files/{file_id}", response_model=None)
async def delete_file(
    file_id: str, fine_tuning: FineTuningDep, principal: PrincipalDep, tenants: TenantsDep
) -> JSONResponse:
    with tenants.admitted(principal.tenant):
        row = await fine_tuning.files.get(file_id, principal)
        await fine_tuning.files.delete(row)
    return JSONResponse({"id": row.id, "object": "file", "deleted": True})


@router.get("/v1/files/{file_id}/content", response_model=None)
async def file_content(file_id: str, fine_tuning: FineTuningDep, principal: PrincipalDep) -> Response:
    row = await fine_tuning.files.get(file_id, principal)
    media_type = "text/csv" if row.filename.endswith(".csv") else "application/jsonl"
    return Response(await fine_tuning.files.content(row), media_type=media_type)

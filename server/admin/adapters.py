"""The adapter admin API, and vLLM's load/unload aliases.

Registering from a server path reads server files on the caller's behalf, so it is for the
admin alone; tenants upload the files instead (multipart, or one .tar.gz).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.responses import PlainTextResponse

from adapters.compose import MAX_INPUTS, Recipe, compose_registered
from adapters.convert import MINIMIND, MINIMIND_FILE, PEFT, SOURCE_FORMATS
from adapters.errors import AdapterNotFound, AdapterTooLarge, InvalidComposition
from adapters.registry import AdapterEntry, Registry
from adapters.spec import SHARED
from adapters.store import copy_folder, extract_tarball, write_files, write_stream
from server.http.auth import AdminOnly, Principal
from server.http.deps import AdminDep, PrincipalDep, RegistryDep, TenantsDep
from server.http.errors import GatewayError, InvalidRequest, ModelNotFound
from server.http.responses import JSONResponse
from server.http.tenancy import Tenants
from server.openai.protocol import ModelName

router = APIRouter()

_MULTIPART_OVERHEAD = 64 * 1024


class UnknownAdapter(ModelNotFound):
    """No adapter by that name that this caller may see."""

    code = "adapter_not_found"

    def __init__(self, name: str):
        super().__init__(name)
        self.message = f"no adapter named '{name[:128]}'"
        self.param = "name"


class LengthRequired(GatewayError):
    status_code = 411
    error_type = "invalid_request_error"
    code = "length_required"


class AlreadyRegistered(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "adapter_exists"


class RegisterFromPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1, max_length=4096)
    owner: str | None = Field(None, description="register for this tenant instead of sharing it")


class ComposeSpec(BaseModel):
    """Adapters the caller may use, and how to compose them (adapters/compose.py)."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[ModelName] = Field(min_length=1, max_length=MAX_INPUTS)
    weights: list[float] | None = Field(None, description="one per adapter; 1.0 each when left out")
    method: str = Field("cat", max_length=32, description="cat, svd, linear, ties, dare_linear or dare_ties")
    rank: int | None = Field(None, description="svd: the result's rank")
    density: float | None = Field(None, description="ties, dare_*: the share of values kept")
    majority_sign_method: str | None = Field(None, description="ties, dare_ties: total or frequency")
    seed: int | None = Field(None, description="dare_*: the random draws")


class RegisterComposition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    compose: ComposeSpec
    owner: str | None = Field(None, description="register for this tenant instead of sharing it")


class VllmLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=64)
    lora_path: str = Field(min_length=1, max_length=4096)


class VllmUnload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=200)
    lora_int_id: int | None = None


def adapter_card(entry: AdapterEntry, principal: Principal) -> dict[str, Any]:
    card = {
        "name": entry.qualified_name if principal.admin else entry.name,
        "owner": entry.owner or None,
        "shared": entry.owner == SHARED,
        "rank": entry.spec.rank,
        "target_modules": list(entry.spec.target_modules),
        "size_bytes": entry.spec.size_bytes,
        "content_hash": "sha256:" + entry.spec.content_hash,
        "state": entry.state,
        "pinned": entry.pinned,
        "in_flight": entry.in_flight,
        "request_count": entry.request_count,
        "last_used": entry.last_used,
        "created": entry.registered_at,
    }
    if not principal.admin:
        del card["owner"]
    return card


def _owner_for(principal: Principal, requested: str | None, tenants: Tenants) -> str:
    if requested is None or requested == "":
        return principal.owner
    if not principal.admin:
        raise AdminOnly("registering for another owner")
    tenants.limits(requested)  # 404 for an unknown tenant
    return requested


def _editable(registry: Registry, principal: Principal, name: str) -> AdapterEntry:
    """An adapter this caller may change: a tenant its own, the admin any ('tenant/name')."""
    if principal.admin:
        owner, sep, plain = name.partition("/")
        entry = registry.find(owner, plain) if sep else registry.find(SHARED, name)
    else:
        entry = registry.find(principal.owner, name)
        if entry is None and registry.find(SHARED, name) is not None:
            raise AdminOnly("changing a shared adapter")
    if entry is None:
        raise UnknownAdapter(name)
    return entry


def _max_adapters(tenants: Tenants, owner: str) -> int | None:
    """The owner's adapter quota; shared adapters (the admin's) have none."""
    return None if owner == SHARED else tenants.limits(owner).max_adapters


@router.post("/v1/adapters", status_code=201, response_model=None)
async def register_adapter(
    request: Request, registry: RegistryDep, tenants: TenantsDep, principal: PrincipalDep
) -> JSONResponse:
    """Register (or replace) an adapter: JSON {name, path} for the admin, JSON {name, compose}, or an upload."""
    with tenants.admitted(principal.tenant):  # a tenant's rate and concurrency first: then read, convert, store
        return await _register(request, registry, tenants, principal)


async def _register(request: Request, registry: Registry, tenants: Tenants, principal: Principal) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        entry = await _register_upload(request, registry, tenants, principal)
    elif content_type.startswith("application/json"):
        raw = await request.body()
        if _asks_to_compose(raw):
            entry, composition = await _register_composition(raw, registry, tenants, principal)
            return JSONResponse(adapter_card(entry, principal) | {"composition": composition}, status_code=201)
        if not principal.admin:
            raise AdminOnly("registering from a server path")
        body = RegisterFromPath.model_validate_json(raw)
        owner = _owner_for(principal, body.owner, tenants)
        max_bytes = registry.rules.max_bytes if registry.rules else 0
        folder = Path(body.path)
        quota = _max_adapters(tenants, owner)
        async with registry.adapter_quota(owner, body.name, quota):
            entry = await registry.add_folder(
                owner, body.name, lambda staging: copy_folder(folder, staging, max_bytes), max_adapters=quota
            )
    else:
        raise InvalidRequest(
            "send application/json {name, path} (admin) or {name, compose}, or multipart/form-data with the files"
        )
    return JSONResponse(adapter_card(entry, principal), status_code=201)


def _asks_to_compose(raw: bytes) -> bool:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False  # the {name, path} form's validation says what is wrong
    return isinstance(body, dict) and "compose" in body


async def _register_composition(
    raw: bytes, registry: Registry, tenants: Tenants, principal: Principal
) -> tuple[AdapterEntry, dict[str, Any]]:
    """Compose adapters the caller may use (a tenant: its own and shared ones) into a new one."""
    body = RegisterComposition.model_validate_json(raw)
    spec = body.compose
    weights = spec.weights if spec.weights is not None else [1.0] * len(spec.adapters)
    try:
        recipe = Recipe.of(
            spec.method,
            weights,
            rank=spec.rank,
            density=spec.density,
            majority_sign_method=spec.majority_sign_method,
            seed=spec.seed,
        )
        owner = _owner_for(principal, body.owner, tenants)
        inputs = [_composition_input(registry, principal, name, i) for i, name in enumerate(spec.adapters)]
        quota = _max_adapters(tenants, owner)
        async with registry.adapter_quota(owner, body.name, quota):
            entry, result = await compose_registered(
                registry, owner, body.name, inputs, recipe, spec.adapters, max_adapters=quota
            )
    except InvalidComposition as exc:
        exc.param = f"compose.{exc.param}" if exc.param else "compose"
        raise
    summary = {"method": recipe.method, "adapters": spec.adapters, "weights": list(recipe.weights)}
    return entry, summary | {"rank": result.rank, "exact": result.exact, "relative_error": result.relative_error}


def _composition_input(registry: Registry, principal: Principal, name: str, index: int) -> AdapterEntry:
    try:
        entry = registry.resolve(name, tenant=principal.tenant, admin=principal.admin)
    except AdapterNotFound:
        error = UnknownAdapter(name)
        error.param = f"compose.adapters.{index}"
        raise error from None
    if entry is registry.base:
        raise InvalidComposition(f"'{name[:64]}' is the base model; compose adapters", param=f"adapters.{index}")
    return entry


async def _register_upload(
    request: Request, registry: Registry, tenants: Tenants, principal: Principal
) -> AdapterEntry:
    limit = (
        tenants.limits(principal.tenant).max_upload_bytes
        if principal.tenant
        else (registry.rules.max_bytes if registry.rules else 0)
    )
    declared = request.headers.get("content-length")
    if declared is None:
        raise LengthRequired("uploads need a Content-Length header")
    if not declared.isdigit() or int(declared) > limit + _MULTIPART_OVERHEAD:
        raise AdapterTooLarge(f"the upload is over this tenant's {limit}-byte limit")
    form = await request.form(max_files=4, max_fields=4)
    try:
        name = form.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("the form needs a 'name' field", param="name")
        owner_field = form.get("owner")
        owner = _owner_for(principal, owner_field if isinstance(owner_field, str) else None, tenants)
        format_field = form.get("format", PEFT)
        if not isinstance(format_field, str) or format_field not in SOURCE_FORMATS:
            raise InvalidRequest(f"format is one of {', '.join(SOURCE_FORMATS)} (default {PEFT})", param="format")
        uploads = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not uploads:
            raise InvalidRequest(
                "the form holds no files; send adapter_config.json and adapter_model.safetensors, or one .tar.gz",
                param="file",
            )
        if sum(upload.size or 0 for upload in uploads) > limit:
            raise AdapterTooLarge(f"the upload is over this tenant's {limit}-byte limit")
        fill = _filler(format_field, [(upload.filename or "", upload.file) for upload in uploads], limit)
        quota = _max_adapters(tenants, owner)
        async with registry.adapter_quota(owner, name, quota):
            # The parts are spooled to temporary files by the form parser; they are copied from
            # there into staging within `limit`, never read whole into memory.
            return await registry.add_folder(owner, name, fill, source_format=format_field, max_adapters=quota)
    finally:
        await form.close()


def _filler(source_format: str, files: list[tuple[str, BinaryIO]], limit: int) -> Callable[[Path], None]:
    """What stages an upload's files: one MiniMind .pth, one archive, or the adapter's files."""
    if source_format == MINIMIND:
        if len(files) != 1:
            raise InvalidRequest("format=minimind takes one file: the MiniMind LoRA .pth", param="file")
        return lambda staging: write_stream(files[0][1], staging / MINIMIND_FILE, limit)
    if len(files) == 1 and files[0][0].endswith((".tar.gz", ".tgz", ".tar")):
        return lambda staging: extract_tarball(files[0][1], staging, limit)
    return lambda staging: write_files(files, staging, limit)


@router.get("/v1/adapters", response_model=None)
async def list_adapters(registry: RegistryDep, principal: PrincipalDep) -> JSONResponse:
    entries = registry.entries(principal.visible_owners)
    return JSONResponse({"object": "list", "data": [adapter_card(e, principal) for e in entries]})


@router.get("/v1/adapters/{name:path}", response_model=None)
async def get_adapter(name: str, registry: RegistryDep, principal: PrincipalDep) -> JSONResponse:
    try:
        entry = registry.resolve(name, tenant=principal.tenant, admin=principal.admin)
    except AdapterNotFound:
        raise UnknownAdapter(name) from None
    if entry is registry.base:
        raise UnknownAdapter(name)
    return JSONResponse(adapter_card(entry, principal))


@router.delete("/v1/adapters/{name:path}", response_model=None)
async def delete_adapter(name: str, registry: RegistryDep, principal: PrincipalDep) -> JSONResponse:
    entry = _editable(registry, principal, name)
    await registry.unregister(entry)
    return JSONResponse({"name": name, "object": "adapter", "deleted": True})


@router.post("/v1/adapters/{name:path}/pin", response_model=None)
async def pin_adapter(name: str, registry: RegistryDep, tenants: TenantsDep, principal: PrincipalDep) -> JSONResponse:
    """Keep an adapter in the engine's cache: a tenant at most `max_pinned`, and tenants together half the cache."""
    entry = _editable(registry, principal, name)
    max_pinned = tenants.limits(principal.tenant).max_pinned if principal.tenant else None
    return JSONResponse(adapter_card(await registry.set_pinned(entry, True, max_pinned=max_pinned), principal))


@router.post("/v1/adapters/{name:path}/unpin", response_model=None)
async def unpin_adapter(name: str, registry: RegistryDep, principal: PrincipalDep) -> JSONResponse:
    return JSONResponse(adapter_card(await registry.set_pinned(_editable(registry, principal, name), False), principal))


@router.post("/v1/load_lora_adapter", response_model=None)
async def vllm_load(body: VllmLoad, registry: RegistryDep, principal: AdminDep) -> Response:
    """vLLM's endpoint: 200 with plain text; a name already loaded is 400."""
    if registry.find(SHARED, body.lora_name) is not None:
        raise AlreadyRegistered(
            f"adapter '{body.lora_name}' is already registered; unload it first or use POST /v1/adapters",
            param="lora_name",
        )
    max_bytes = registry.rules.max_bytes if registry.rules else 0
    folder = Path(body.lora_path)
    fill = lambda staging: copy_folder(folder, staging, max_bytes)  # noqa: E731
    await registry.add_folder(SHARED, body.lora_name, fill, load=True)  # vLLM's route loads it
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_model=None)
async def vllm_unload(body: VllmUnload, registry: RegistryDep, principal: AdminDep) -> Response:
    entry = _editable(registry, principal, body.lora_name)
    await registry.unregister(entry)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

"""build_app: wires routers, error handlers and the lifespan, and nothing else."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI

from adapters.registry import Registry
from adapters.retention import StoreSweep
from adapters.spec import SHARED
from adapters.store import copy_folder
from server.admin import adapters, cluster, scheduling, tenant_deletion, tenants, usage
from server.admin import export as export_route
from server.batches import router as batches_route
from server.config import Settings
from server.console import router as ui
from server.engine.protocol import Engine, EngineDead
from server.finetune import files_router as files
from server.finetune import jobs_router as fine_tuning
from server.finetune import models_router as fine_tuned_models
from server.finetune.service import file_blobs
from server.http.auth import KeyRing
from server.http.bodylimit import BodyLimitMiddleware
from server.http.errors import install_error_handlers
from server.http.middleware import RequestGate, TelemetryMiddleware
from server.http.open_mode import OpenModeGuard
from server.http.responses import JSONResponse
from server.http.tenancy import TenantLimits, Tenants
from server.openai import chat, completions, models, tokenize
from server.openai.fairness import FairQueue
from server.openai.generation import Generator
from server.openai.responses import router as responses_route
from server.ops import health
from server.ops import metrics_router as metrics_route
from server.ops.catalog_sync import CatalogSync
from server.ops.metrics import GatewayMetrics
from server.ops.store_sweep import run_sweeps
from server.ops.usage import UsageWindow
from server.tgi import router as tgi_route

logger = logging.getLogger(__name__)


def build_app(
    settings: Settings,
    engine: Engine,
    registry: Registry,
    preload: dict[str, Path] | None = None,
    metrics: GatewayMetrics | None = None,
) -> FastAPI:
    """The gateway around a started engine and its registry (with a catalog).

    The lifespan restores the catalog, registers `preload` (--lora-modules) as shared adapters,
    and shuts the engine down at the end.
    """
    if registry.catalog is None:
        raise ValueError("the registry needs a catalog")
    keyring = KeyRing(registry.catalog, settings.admin_key, settings.metrics_key)
    tenant_defaults = TenantLimits(
        max_concurrent=settings.tenant_max_concurrent,
        requests_per_second=settings.tenant_requests_per_second,
        max_adapters=settings.tenant_max_adapters,
        max_upload_bytes=settings.max_adapter_bytes,
        max_file_bytes=settings.tenant_max_file_bytes,
        max_queued_jobs=settings.tenant_max_queued_jobs,
        max_pinned=settings.tenant_max_pinned,
        max_merges=settings.tenant_max_merges,
        max_queued_batches=settings.tenant_max_queued_batches,
        max_batch_lines=settings.tenant_max_batch_lines,
        max_stored_responses=settings.tenant_max_stored_responses,
        max_training_seconds=settings.max_training_seconds,
    )
    tenant_book = Tenants(registry.catalog, tenant_defaults)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        max_bytes = settings.max_adapter_bytes
        for name, folder in (preload or {}).items():
            fill = lambda staging, f=folder: copy_folder(f, staging, max_bytes)  # noqa: E731
            await registry.add_folder(SHARED, name, fill, load=True)  # --lora-modules: loaded at start, as vLLM does
        if keyring.open:
            logger.warning(
                "no --admin-key: every caller is the admin, for local work only; answering only requests "
                "addressed to localhost, a loopback address or %s, and none from another site's web pages",
                settings.host,
            )
        app.state.ready = True
        logger.info("serving %s with %d adapters", registry.base_name, len(registry.entries()))
        watchdog = asyncio.create_task(_watch_engine(app, engine))
        sync = CatalogSync(
            registry.catalog,
            registry,
            tenant_book,
            keyring,
            settings.catalog_poll_seconds,
            on_tenant_gone=lambda name: tenant_deletion.on_tenant_gone(app.state, name),
        )
        app.state.catalog_sync = sync
        background = [asyncio.create_task(sync.run())]
        if settings.store_sweep_seconds > 0:
            sweeps = run_sweeps(
                app.state.store_sweep, lambda: tenant_deletion.held_hashes(app.state), settings.store_sweep_seconds
            )
            background.append(asyncio.create_task(sweeps))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            watchdog.cancel()
            app.state.ready = False
            await engine.shutdown()
            registry.work.close()

    app = FastAPI(
        title="lora-gateway",
        summary="OpenAI-compatible API over one base model and many LoRA adapters",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.registry = registry
    app.state.keyring = keyring
    app.state.tenants = tenant_book
    app.state.generator = Generator(
        engine,
        registry,
        tenant_book,
        settings.adapter_dir,
        settings.max_in_flight,
        max_sequences=settings.max_sequences_per_request,
        max_prompt_chars=settings.max_prompt_chars,
        fair_queue=FairQueue(settings.fair_depth, batch=settings.engine_sequences, policy=settings.scheduling),
        admin_weight=settings.admin_weight,
        tool_call_parser=settings.tool_call_parser if settings.enable_auto_tool_choice else None,
    )
    app.state.ready = False
    app.state.metrics = metrics or GatewayMetrics(registry.base_name, settings.metrics_adapter_labels)
    app.state.metrics.watch(registry)
    app.state.metrics.watch_fair_queue(app.state.generator.fair_queue)
    registry.catalog.on_error = app.state.metrics.catalog_error
    if registry.store is not None:
        registry.store.on_error = app.state.metrics.store_error
    app.state.gate = RequestGate()
    app.state.usage = UsageWindow()
    app.state.store_sweep = StoreSweep(
        registry.catalog,
        registry.store,
        file_blobs(registry.store, settings.state_dir),
        settings.store_grace_seconds,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_upload_bytes=settings.max_adapter_bytes,
        max_file_bytes=settings.max_file_bytes,
    )
    if keyring.open:
        # Inside the telemetry, so that a refusal is counted, logged and carries its request id.
        app.add_middleware(OpenModeGuard, listen_host=settings.host)
    app.add_middleware(TelemetryMiddleware)
    before_console, after_console = _surfaces()
    _add_routes(app, before_console)
    app.mount(ui.UI_PATH, ui.console_app(), name="console")
    _add_routes(app, after_console)  # TGI's GET / after the console's
    return app


@cache
def _surfaces() -> tuple[APIRouter, APIRouter]:
    """Every surface's routes, in order, around the console's mount; built once per process.

    FastAPI's include_router builds each route anew and analyses its dependencies again, about
    2 ms a route, 0.1 s an app: the suite builds hundreds. The routes hold no state of an app's
    (that is app.state, reached through the request), so every app of a process shares them; the
    one thing they do not follow is an app's dependency_overrides, which nothing here uses.
    """
    before_console, after_console = APIRouter(), APIRouter()
    before_console.include_router(metrics_route.router)
    before_console.include_router(responses_route.router)
    for module in (health, models, completions, chat, tokenize, adapters, tenants, cluster, scheduling, usage, ui):
        before_console.include_router(module.router)
    after_console.include_router(export_route.router)
    after_console.include_router(tgi_route.router)  # TGI's and LoRAX's API
    after_console.include_router(fine_tuning.router)
    after_console.include_router(fine_tuned_models.router)
    after_console.include_router(files.router)
    after_console.include_router(batches_route.router)  # after fine-tuning's: its lifespan opens the files it uses
    return before_console, after_console


def _add_routes(app: FastAPI, surfaces: APIRouter) -> None:
    """What app.include_router(surfaces) does, with the same route objects: the routes, then the
    routers' lifespans, entered inside the app's own in the order they were included."""
    app.router.routes.extend(surfaces.routes)
    outer, inner = app.router.lifespan_context, surfaces.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict | None]:
        async with outer(app) as outer_state, inner(app) as inner_state:
            yield (
                None if outer_state is None and inner_state is None else {**(inner_state or {}), **(outer_state or {})}
            )

    app.router.lifespan_context = lifespan


ENGINE_CHECK_SECONDS = 0.5


async def _watch_engine(app: FastAPI, engine: Engine) -> None:
    """When the engine dies, stop being ready and let the process end (non-zero) for a restart.

    Requests already fail fast with 503 once the engine is unhealthy; `on_engine_death` (set by
    the command line) asks the server to drain and exit. Nothing in the catalog is lost.
    """
    while engine.is_healthy:
        await asyncio.sleep(ENGINE_CHECK_SECONDS)
    app.state.ready = False
    app.state.generator.fair_queue.fail_waiting(EngineDead())  # requests waiting for a turn get 503
    engine.fail_in_flight()  # and so do those the engine had
    logger.error("the inference engine has died; the gateway stops so that it can be restarted")
    on_death: Callable[[], None] | None = getattr(app.state, "on_engine_death", None)
    if on_death is not None:
        on_death()
    while True:  # a request that was just being handed to the engine as it died fails too
        await asyncio.sleep(ENGINE_CHECK_SECONDS)
        engine.fail_in_flight()

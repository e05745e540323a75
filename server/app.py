"""build_app: wires routers, error handlers and the lifespan, and nothing else."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pathlib import Path

from adapters.catalog import SHARED
from adapters.registry import Registry
from adapters.store import copy_folder
from server.auth import KeyRing
from server.config import Settings
from server.engine_protocol import Engine
from server.errors import install_error_handlers
from server.generation import Generator
from server.responses import JSONResponse
from server.routes import adapters, chat, completions, health, models, tenants
from server.tenancy import TenantLimits, Tenants

logger = logging.getLogger(__name__)


def build_app(
    settings: Settings, engine: Engine, registry: Registry, preload: dict[str, Path] | None = None
) -> FastAPI:
    """The gateway around a started engine and its registry (with a catalog).

    The lifespan restores the catalog, registers `preload` (--lora-modules) as shared adapters,
    and shuts the engine down at the end.
    """
    if registry.catalog is None:
        raise ValueError("the registry needs a catalog")
    keyring = KeyRing(registry.catalog, settings.admin_key)
    tenant_defaults = TenantLimits(
        max_concurrent=settings.tenant_max_concurrent,
        requests_per_second=settings.tenant_requests_per_second,
        max_adapters=settings.tenant_max_adapters,
        max_upload_bytes=settings.max_adapter_bytes,
    )
    tenant_book = Tenants(registry.catalog, tenant_defaults)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        max_bytes = settings.max_adapter_bytes
        for name, folder in (preload or {}).items():
            await registry.add_folder(SHARED, name, lambda staging, f=folder: copy_folder(f, staging, max_bytes))
        if keyring.open:
            logger.warning("no --admin-key: every caller is the admin; use this for local work only")
        app.state.ready = True
        logger.info("serving %s with %d adapters", registry.base_name, len(registry.entries()))
        try:
            yield
        finally:
            app.state.ready = False
            await engine.shutdown()

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
    app.state.generator = Generator(engine, registry, tenant_book, settings.adapter_dir)
    app.state.ready = False
    install_error_handlers(app)
    for module in (health, models, completions, chat, adapters, tenants):
        app.include_router(module.router)
    return app

"""build_app: wires routers, error handlers and the lifespan, and nothing else."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from adapters.registry import Registry
from adapters.spec import AdapterSpec
from server.config import Settings
from server.engine_protocol import Engine
from server.errors import install_error_handlers
from server.generation import Generator
from server.responses import JSONResponse
from server.routes import chat, completions, health, models

logger = logging.getLogger(__name__)


def build_app(
    settings: Settings, engine: Engine, registry: Registry, preload: dict[str, AdapterSpec] | None = None
) -> FastAPI:
    """The gateway around a started engine. The lifespan loads `preload` and shuts the engine down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        for name, spec in (preload or {}).items():
            await registry.register(name, spec, load=True)
        app.state.ready = True
        logger.info("serving %s with %d adapters", registry.base_name, len(registry.names()))
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
    app.state.generator = Generator(engine, registry)
    app.state.ready = False
    install_error_handlers(app)
    for module in (health, models, completions, chat):
        app.include_router(module.router)
    return app

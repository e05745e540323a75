from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.database import Database
from adapters.registry import Registry
from adapters.spec import SHARED
from server.app import build_app
from server.config import Settings
from tests.fakes import FakeEngine, fake_spec

# Session fixtures for real PostgreSQL, S3 (moto's server) and Chromium; each starts only when a test asks.
pytest_plugins = ["tests.services.postgres", "tests.services.s3", "tests.services.browser"]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The embedded demo (a base model and two adapters), built once per session."""
    from adapters.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("demo-cache"))


@dataclass
class FakeGateway:
    client: httpx.AsyncClient
    engine: FakeEngine
    registry: Registry
    app: object = None


@pytest.fixture
async def gateway(tmp_path) -> AsyncIterator[FakeGateway]:
    """The whole app over a FakeEngine, serving base model 'base' and adapters 'alpha' and 'beta'."""
    settings = Settings(served_model_name="base", max_cpu_loras=3, max_loras=2, state_dir=tmp_path)
    engine = FakeEngine(cache_size=3)  # two adapters and the zero adapter, as the real engine gets
    registry = Registry(
        engine,
        base_name="base",
        base_adapter=fake_spec("__base__", 1),
        max_resident=2,
        catalog=Database(tmp_path / "catalog.sqlite3"),
    )
    app = build_app(settings, engine, registry)
    async with app.router.lifespan_context(app):
        await registry.register(SHARED, "alpha", fake_spec("alpha"), load=True)
        await registry.register(SHARED, "beta", fake_spec("beta", 16), load=True)
        transport = httpx.ASGITransport(app=app)
        # Open mode answers local names only (server/http/open_mode.py).
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield FakeGateway(client, engine, registry, app)


ADMIN_KEY = "admin-secret-key-for-the-fast-tests-0123"


@dataclass
class FullGateway:
    """An app with a store, catalog and admin key over a FakeEngine."""

    client: httpx.AsyncClient
    engine: FakeEngine
    registry: Registry
    app: object

    def as_(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.as_(ADMIN_KEY)


@asynccontextmanager
async def full_gateway(
    state_dir: Path, engine: FakeEngine | None = None, zero_adapter: bool = True, **overrides
) -> AsyncIterator[FullGateway]:
    """Build (or rebuild, on the same state_dir) the whole gateway around a FakeEngine.

    zero_adapter: base requests run through a zero adapter (--lora-ops vllm), or carry none.
    """
    from adapters.registry import AdapterRules
    from server.gateway import open_store
    from tests.adapter_files import TINY_BASE

    settings = Settings(
        served_model_name="base",
        state_dir=state_dir,
        admin_key=ADMIN_KEY,
        lora_ops="vllm" if zero_adapter else "grouped",
        **({"max_cpu_loras": 2, "max_loras": 2} | overrides),
    )
    engine = engine or FakeEngine(cache_size=settings.max_cpu_loras + zero_adapter)
    registry = Registry(
        engine,
        base_name="base",
        base_adapter=fake_spec("__base__", 1) if zero_adapter else None,
        max_resident=settings.max_cpu_loras,
        catalog=Database(settings.catalog_location),
        store=open_store(settings),
        rules=AdapterRules(TINY_BASE, settings.max_lora_rank, settings.max_adapter_bytes),
    )
    app = build_app(settings, engine, registry)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield FullGateway(client, engine, registry, app)
    registry.catalog.close()


@pytest.fixture
async def full(tmp_path) -> AsyncIterator[FullGateway]:
    async with full_gateway(tmp_path / "state") as gateway:
        yield gateway

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from adapters.catalog import SHARED, Catalog
from adapters.registry import Registry
from server.app import build_app
from server.config import Settings
from tests.fakes import FakeEngine, fake_spec


@dataclass
class FakeGateway:
    client: httpx.AsyncClient
    engine: FakeEngine
    registry: Registry


@pytest.fixture
async def gateway(tmp_path) -> AsyncIterator[FakeGateway]:
    """The whole app over a FakeEngine, serving base model 'base' and adapters 'alpha' and 'beta'."""
    settings = Settings(served_model_name="base", max_cpu_loras=3, max_loras=2, state_dir=tmp_path)
    engine = FakeEngine()
    registry = Registry(
        engine, base_name="base", base_adapter=fake_spec("__base__", 1), max_resident=2,
        catalog=Catalog(tmp_path / "catalog.sqlite3"),
    )
    app = build_app(settings, engine, registry)
    async with app.router.lifespan_context(app):
        await registry.register(SHARED, "alpha", fake_spec("alpha"), load=True)
        await registry.register(SHARED, "beta", fake_spec("beta", 16), load=True)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield FakeGateway(client, engine, registry)

"""A gateway with one tenant, 't', that tries to hurt it; shared by the tests in this folder."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.adapter_files import make_adapter
from tests.conftest import FullGateway, full_gateway
from tests.routes.test_tenancy import new_tenant, upload


@asynccontextmanager
async def hostile_world(tmp_path: Path, limits: dict | None = None, **settings) -> AsyncIterator[FullGateway]:
    """Tenant 't' (its key in `gw.key`, its headers in `gw.tenant`) owning adapters 'mine' and 'other';
    `limits` are set once those are uploaded, so that even a tiny rate leaves the uploads alone."""
    async with full_gateway(tmp_path / "state", zero_adapter=False, **settings) as gw:
        gw.key = await new_tenant(gw, "t")
        gw.tenant = gw.as_(gw.key)
        for name, seed in (("mine", 1), ("other", 2)):
            response = await upload(gw, gw.key, name, make_adapter(tmp_path / name, seed=seed))
            assert response.status_code == 201, response.text
        if limits:
            response = await gw.client.patch("/v1/tenants/t", json={"limits": limits}, headers=gw.admin)
            assert response.status_code == 200, response.text
        yield gw


def completion(model: str = "mine", **fields) -> dict:
    return {"model": model, "prompt": "x", "max_tokens": 1} | fields


def chat(model: str = "mine", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1} | fields


def generate(adapter_id: str | None = "mine", inputs: str = "x", **parameters) -> dict:
    parameters = {"max_new_tokens": 1} | parameters
    if adapter_id is not None:
        parameters["adapter_id"] = adapter_id
    return {"inputs": inputs, "parameters": parameters}


ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "generate": "/generate"}
BODIES = {"completions": completion, "chat": chat, "generate": generate}


def stored_adapters(gw: FullGateway) -> set[str]:
    """The content hashes of the adapter folders in the store (staging aside)."""
    root = gw.registry.store.root
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def staging_left(gw: FullGateway) -> list[Path]:
    return list((gw.registry.store.root / ".staging").iterdir())

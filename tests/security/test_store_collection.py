"""The store sweep removes what nothing references, and never what a row names, a gateway holds, or is new.

A gateway over a FakeEngine on a real catalog and a real store (a shared folder, or S3). The sweep
reads its clock from `sweep.clock`, so "an hour later" needs no waiting.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from adapters.retention import StoreSweep
from adapters.store import AdapterStore
from adapters.validate import content_hash
from server.admin.tenant_deletion import held_hashes
from tests.adapter_files import make_adapter
from tests.conftest import full_gateway
from tests.security.tenant_world import (
    eventually,
    new_tenant,
    shared_urls_for,
    tiny_base,
    upload_adapter,
    upload_file,
)

GRACE = 600.0


@pytest.fixture(params=["sqlite+folder", "postgresql+s3"])
def shared_urls(request, tmp_path):
    return shared_urls_for(request.param, request, tmp_path)


def put(blobs, key: str, folder: Path) -> None:
    source = folder / key.replace("/", "_")
    source.write_bytes(b"orphan bytes")
    blobs.put(key, source)


async def test_the_sweep_removes_orphans_and_keeps_what_is_referenced_in_use_or_new(tmp_path, shared_urls):
    catalog_url, store_url = shared_urls
    settings = {"catalog_url": catalog_url, "store_url": store_url, "model": str(tiny_base(tmp_path / "base"))}
    async with full_gateway(
        tmp_path / "state", **settings, store_grace_seconds=GRACE, store_sweep_seconds=0, max_cpu_loras=4
    ) as gw:
        acme = await new_tenant(gw, "acme")
        kept = await upload_adapter(gw, acme, "kept", make_adapter(tmp_path / "kept", seed=1))
        replaced = await upload_adapter(gw, acme, "replaced", make_adapter(tmp_path / "v1", seed=2))
        current = await upload_adapter(gw, acme, "replaced", make_adapter(tmp_path / "v2", seed=3))
        deleted = await upload_adapter(gw, acme, "deleted", make_adapter(tmp_path / "deleted", seed=4))
        assert (await gw.client.delete("/v1/adapters/deleted", headers=acme)).status_code == 200
        busy = await upload_adapter(gw, acme, "busy", make_adapter(tmp_path / "busy", seed=5))
        # A merge evicted from its cache, and one still in it.
        merge = {"ids": ["kept", "replaced"], "weights": [1.0, 0.5]}
        body = {"inputs": "x", "parameters": {"merged_adapters": merge, "max_new_tokens": 1}}
        assert (await gw.client.post("/generate", json=body, headers=acme)).status_code == 200
        cache = gw.app.state.merged_adapters
        evicted = cache.entries()[0].spec.content_hash
        cache.max_entries = 1
        merge["weights"] = [1.0, 0.25]
        assert (await gw.client.post("/generate", json=body, headers=acme)).status_code == 200
        (cached,) = [entry.spec.content_hash for entry in cache.entries()]
        # An evicted merge's files go with it, without waiting for the sweep.
        local = tmp_path / "state" / "adapters"
        assert not (local / evicted).exists() and not gw.registry.store.blobs.exists(f"adapters/{evicted}.tar")
        assert (local / cached).is_dir() and cache.files_deleted == 1
        # An adapter deleted while a request to it runs: the engine may still load it from the store.
        gw.engine.release = asyncio.Event()
        request = asyncio.create_task(
            gw.client.post("/v1/completions", json={"model": "busy", "prompt": "x", "max_tokens": 1}, headers=acme)
        )
        await eventually(lambda: gw.engine.running == 1)
        assert (await gw.client.delete("/v1/adapters/busy", headers=acme)).status_code == 200
        # Files: one a row names, and objects left by uploads whose rows were never written.
        file_id = await upload_file(gw, acme)
        blobs = gw.registry.store.blobs
        put(blobs, "files/file-orphan", tmp_path)
        put(blobs, "checkpoints/ftjob-gone/ftckpt-gone.tar", tmp_path)

        sweep: StoreSweep = gw.app.state.store_sweep

        def present() -> dict[str, bool]:
            hashes = {
                "kept": kept,
                "replaced": replaced,
                "current": current,
                "deleted": deleted,
                "busy": busy,
                "cached-merge": cached,
            }
            objects = {f"{name} object": blobs.exists(f"adapters/{h}.tar") for name, h in hashes.items()}
            folders = {f"{name} folder": (local / h).is_dir() for name, h in hashes.items()}
            files = {key: blobs.exists(key) for key in (f"files/{file_id}", "files/file-orphan")}
            return objects | folders | files | {"checkpoint": blobs.exists("checkpoints/ftjob-gone/ftckpt-gone.tar")}

        before = present()
        assert all(before.values()), before
        # Everything is newer than the grace period: nothing goes, however unreferenced.
        assert await asyncio.to_thread(sweep.sweep, held_hashes(gw.app.state)) == 0
        assert present() == before

        sweep.clock = lambda: time.time() + 2 * GRACE
        await asyncio.to_thread(sweep.sweep, held_hashes(gw.app.state))
        after = present()
        gone = {name for name, here in after.items() if not here}
        orphans = ("replaced", "deleted")
        assert gone == {f"{n} {kind}" for n in orphans for kind in ("object", "folder")} | {
            "files/file-orphan",
            "checkpoint",
        }

        gw.engine.release.set()
        assert (await request).status_code == 200
        await asyncio.to_thread(sweep.sweep, held_hashes(gw.app.state))
        assert not present()["busy folder"] and not present()["busy object"]
        assert present()["kept folder"] and present()["cached-merge folder"] and present()[f"files/{file_id}"]


def test_committing_stored_content_again_makes_it_new_to_the_sweep(tmp_path):
    from adapters.database import Database

    store = AdapterStore(tmp_path / "cache")
    source = make_adapter(tmp_path / "source")
    digest = content_hash(source)

    def commit() -> None:
        staging = store.new_staging()
        for path in source.iterdir():
            (staging / path.name).write_bytes(path.read_bytes())
        store.commit(staging, digest)

    commit()
    long_ago = time.time() - 10 * GRACE
    os.utime(store.path_for(digest), (long_ago, long_ago))  # an orphan, old enough to go
    commit()  # registered again, its row not yet written
    sweep = StoreSweep(Database(tmp_path / "catalog.sqlite3"), store, None, GRACE)
    assert sweep.collect_local(set()) == 0 and store.has_local(digest)
    sweep.clock = lambda: time.time() + 2 * GRACE
    assert sweep.collect_local(set()) == 1 and not store.has_local(digest)


async def test_the_periodic_sweep_runs_by_itself(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    async with full_gateway(
        tmp_path / "state", store_url=f"file://{shared}", store_grace_seconds=0, store_sweep_seconds=0.2
    ) as gw:
        put(gw.registry.store.blobs, "files/file-orphan", tmp_path)
        await eventually(lambda: not (shared / "files" / "file-orphan").exists(), within=3)

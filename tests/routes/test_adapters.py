from __future__ import annotations

import asyncio
import os
import stat

import pytest

from tests.adapter_files import BAD_CASES, bad_adapters, make_adapter, tarball
from tests.conftest import full_gateway
from tests.fakes import FakeEngine


def files_of(folder):
    return [("file", (p.name, p.read_bytes())) for p in sorted(folder.iterdir())]


async def complete(gw, model, headers=None, **extra):
    return await gw.client.post(
        "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2} | extra, headers=headers or gw.admin
    )


async def test_register_from_path_copies_into_the_store(full, tmp_path):
    source = make_adapter(tmp_path / "src", rank=8, targets=("q_proj", "o_proj"))
    response = await full.client.post("/v1/adapters", json={"name": "support", "path": str(source)}, headers=full.admin)
    assert response.status_code == 201, response.text
    card = response.json()
    assert (card["name"], card["rank"], card["target_modules"], card["state"], card["pinned"]) == (
        "support",
        8,
        ["o_proj", "q_proj"],
        "registered",
        False,
    )
    assert card["size_bytes"] == sum(p.stat().st_size for p in source.iterdir())
    assert card["content_hash"].startswith("sha256:") and str(tmp_path) not in response.text
    entry = full.registry.find("", "support")
    assert entry.adapter_id not in full.engine.added  # the engine takes it on its first request
    assert (await complete(full, "support")).status_code == 200
    assert entry.adapter_id in full.engine.added
    assert (await full.client.get("/v1/adapters/support", headers=full.admin)).json()["state"] == "loaded"
    # the engine loads the store's read-only copy, which later edits of the source cannot touch
    assert entry.spec.path.parent == tmp_path / "state" / "adapters"
    assert not stat.S_IMODE(os.stat(entry.spec.path / "adapter_model.safetensors").st_mode) & 0o222
    (source / "adapter_config.json").write_text("{}")
    assert (entry.spec.path / "adapter_config.json").read_text() != "{}"
    listed = (await full.client.get("/v1/adapters", headers=full.admin)).json()["data"]
    assert [a["name"] for a in listed] == ["support"]
    assert (await full.client.get("/v1/adapters/support", headers=full.admin)).json()["content_hash"] == card[
        "content_hash"
    ]
    assert (await complete(full, "support")).json()["choices"][0]["text"] == "support-0 support-1 "


@pytest.mark.parametrize("case", BAD_CASES)
async def test_bad_adapters_are_refused_and_leave_nothing(full, tmp_path, case):
    folder, phrase = bad_adapters(tmp_path / "bad", max_rank=64)[case]
    store = tmp_path / "state" / "adapters"
    before = sorted(p.name for p in store.iterdir())
    response = await full.client.post("/v1/adapters", json={"name": "bad", "path": str(folder)}, headers=full.admin)
    assert 400 <= response.status_code < 500
    error = response.json()["error"]
    assert phrase in error["message"] and str(tmp_path) not in error["message"]
    assert full.registry.find("", "bad") is None and full.registry.catalog.adapters() == []
    assert sorted(p.name for p in store.iterdir()) == before  # nothing half-written
    assert (await complete(full, "base")).status_code == 200


async def test_invalid_names_are_refused(full, tmp_path):
    source = make_adapter(tmp_path / "src")
    for name in ["../etc", "a/b", "", "x" * 65, "base", "-lead", "sp ace", "ends-in-newline\n"]:
        response = await full.client.post("/v1/adapters", json={"name": name, "path": str(source)}, headers=full.admin)
        assert response.status_code == 400, name
    assert full.registry.entries() == []


async def test_engine_refusal_leaves_nothing_when_loading_and_is_a_400_on_first_use(full, tmp_path):
    source = make_adapter(tmp_path / "src")
    full.engine.refuse_paths = {"*"}
    full.engine.refuse_all = True
    # vLLM's route loads at once: a refusal leaves nothing behind.
    response = await full.client.post(
        "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(source)}, headers=full.admin
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_adapter"
    assert full.registry.entries() == [] and full.registry.catalog.adapters() == []
    # A registration is loaded on its first request: a refusal then is that request's 400.
    response = await full.client.post("/v1/adapters", json={"name": "x", "path": str(source)}, headers=full.admin)
    assert response.status_code == 201, response.text
    refused = await complete(full, "x")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_adapter"
    assert full.registry.find("", "x").adapter_id not in full.engine.cache
    assert full.engine.generated == []


async def test_uploads_files_and_tarballs(full, tmp_path):
    source = make_adapter(tmp_path / "src", rank=16)
    response = await full.client.post("/v1/adapters", data={"name": "up"}, files=files_of(source), headers=full.admin)
    assert response.status_code == 201, response.text
    for prefix in ["", "adapter/"]:
        archive = tarball(source, prefix=prefix)
        response = await full.client.post(
            "/v1/adapters", data={"name": "tgz"}, files=[("file", ("a.tar.gz", archive))], headers=full.admin
        )
        assert response.status_code == 201, response.text
        assert response.json()["rank"] == 16
    evil = tarball(source, prefix="../")
    response = await full.client.post(
        "/v1/adapters", data={"name": "evil"}, files=[("file", ("a.tar.gz", evil))], headers=full.admin
    )
    assert response.status_code == 400 and "outside" in response.json()["error"]["message"]
    pickle = [
        ("file", ("adapter_config.json", (source / "adapter_config.json").read_bytes())),
        ("file", ("adapter_model.bin", b"\x80\x04.")),
    ]
    response = await full.client.post("/v1/adapters", data={"name": "pkl"}, files=pickle, headers=full.admin)
    assert response.status_code == 400 and "pickled" in response.json()["error"]["message"]
    assert full.registry.find("", "evil") is None and full.registry.find("", "pkl") is None


async def test_delete_pin_and_unpin(full, tmp_path):
    source = make_adapter(tmp_path / "src")
    await full.client.post("/v1/adapters", json={"name": "a", "path": str(source)}, headers=full.admin)
    assert (await complete(full, "a")).status_code == 200  # the engine holds it now
    assert (await full.client.post("/v1/adapters/a/pin", headers=full.admin)).json()["pinned"] is True
    assert full.registry.catalog.adapters()[0].pinned is True
    assert (await full.client.post("/v1/adapters/a/unpin", headers=full.admin)).json()["pinned"] is False
    entry = full.registry.find("", "a")
    assert (await full.client.delete("/v1/adapters/a", headers=full.admin)).status_code == 200
    assert entry.adapter_id in full.engine.removed
    gone = await complete(full, "a")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert (await full.client.delete("/v1/adapters/a", headers=full.admin)).status_code == 404


async def test_vllm_compatible_load_and_unload(full, tmp_path):
    source = make_adapter(tmp_path / "src")
    response = await full.client.post(
        "/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": str(source)}, headers=full.admin
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    again = await full.client.post(
        "/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": str(source)}, headers=full.admin
    )
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    missing = await full.client.post(
        "/v1/load_lora_adapter", json={"lora_name": "w", "lora_path": str(tmp_path / "no")}, headers=full.admin
    )
    assert missing.status_code == 400 and str(tmp_path) not in missing.text
    assert (
        await full.client.post("/v1/unload_lora_adapter", json={"lora_name": "v"}, headers=full.admin)
    ).status_code == 200
    assert (
        await full.client.post("/v1/unload_lora_adapter", json={"lora_name": "v"}, headers=full.admin)
    ).status_code == 404


async def test_restart_serves_the_same_adapters(tmp_path):
    source = make_adapter(tmp_path / "src", rank=8)
    state = tmp_path / "state"
    async with full_gateway(state) as first:
        card = (
            await first.client.post("/v1/adapters", json={"name": "keep", "path": str(source)}, headers=first.admin)
        ).json()
        await first.client.post("/v1/adapters/keep/pin", headers=first.admin)
    async with full_gateway(state) as second:
        restored = (await second.client.get("/v1/adapters/keep", headers=second.admin)).json()
        assert (restored["content_hash"], restored["rank"], restored["pinned"], restored["state"]) == (
            card["content_hash"],
            8,
            True,
            "registered",
        )
        response = await complete(second, "keep")
        assert response.status_code == 200
        entry = second.registry.find("", "keep")
        assert entry.resident and second.engine.added[-1] == entry.adapter_id


@pytest.mark.parametrize("zero_adapter", [True, False])
async def test_the_engine_cache_drops_least_recently_used_never_pinned(tmp_path, zero_adapter):
    # The engine caches 2, plus the zero adapter when base requests run through one.
    async with full_gateway(tmp_path / "state", zero_adapter=zero_adapter, max_cpu_loras=2) as gw:
        for i in range(4):
            source = make_adapter(tmp_path / f"src{i}", seed=i)
            await gw.client.post("/v1/adapters", json={"name": f"a{i}", "path": str(source)}, headers=gw.admin)
            assert (await complete(gw, f"a{i}")).status_code == 200  # loaded on its first request
        ids = {f"a{i}": gw.registry.find("", f"a{i}").adapter_id for i in range(4)}
        assert gw.registry.resident_count == 2 and set(gw.engine.cache) >= {ids["a2"], ids["a3"]}
        await gw.client.post("/v1/adapters/a0/pin", headers=gw.admin)
        assert (await complete(gw, "a0")).status_code == 200  # reloaded by the engine, no add_lora
        assert gw.engine.reloaded == [ids["a0"]]
        for name in ["a1", "a2", "a3", "a1", "a2", "a3"]:  # a0 is the oldest after each of these
            assert (await complete(gw, name)).status_code == 200
            assert ids["a0"] in gw.engine.cache, name
        # The registry's mirror agrees with the engine's cache.
        cached = {entry.adapter_id for entry in gw.registry.entries() if entry.resident}
        assert cached | ({gw.registry.base.adapter_id} if zero_adapter else set()) == set(gw.engine.cache)
        await gw.client.post("/v1/adapters/a0/unpin", headers=gw.admin)
        for name in ["a1", "a2"]:
            assert (await complete(gw, name)).status_code == 200
        assert ids["a0"] not in gw.engine.cache  # unpinned, it goes like any other


@pytest.mark.parametrize("zero_adapter", [True, False])
async def test_base_requests_and_the_zero_adapter(tmp_path, zero_adapter):
    async with full_gateway(tmp_path / "state", zero_adapter=zero_adapter, max_cpu_loras=2) as gw:
        source = make_adapter(tmp_path / "src", seed=1)
        await gw.client.post("/v1/adapters", json={"name": "c1", "path": str(source)}, headers=gw.admin)
        assert (await complete(gw, "c1")).status_code == 200
        assert (await complete(gw, "base")).status_code == 200
        adapter = gw.engine.generated[-1][3]
        base_id = gw.registry.base.adapter_id
        if zero_adapter:  # loaded at start, pinned, and every base request runs through it
            assert adapter.adapter_id == base_id and base_id in gw.engine.cache and gw.engine.added[0] == base_id
        else:  # no adapter at all: it takes no cache entry and no batch slot
            assert adapter is None and base_id not in gw.engine.added and base_id not in gw.engine.cache
            assert gw.engine.cache_size == 2
        assert gw.registry.resident_count == 1 and gw.registry.base.request_count == 1


async def test_no_request_waits_for_a_cache_slot(tmp_path):
    # Four adapters busy at once with room for two: vLLM's scheduler holds the requests, and its
    # worker reloads each adapter from the store when a batch needs it.
    async with full_gateway(tmp_path / "state", max_cpu_loras=2) as gw:
        for i in range(4):
            source = make_adapter(tmp_path / f"src{i}", seed=i)
            await gw.client.post("/v1/adapters", json={"name": f"b{i}", "path": str(source)}, headers=gw.admin)
            assert (await complete(gw, f"b{i}")).status_code == 200  # the engine has taken it once
        await gw.client.post("/v1/adapters/b0/pin", headers=gw.admin)
        gw.engine.release = asyncio.Event()
        busy = [asyncio.create_task(complete(gw, f"b{i}")) for i in range(4)]
        await asyncio.sleep(0.05)
        assert gw.engine.running == 4  # all four reached the engine; none waits in the gateway
        gw.engine.release.set()
        answers = await asyncio.gather(*busy)
        assert [r.status_code for r in answers] == [200] * 4
        assert [r.json()["choices"][0]["text"].split("-")[0] for r in answers] == [f"b{i}" for i in range(4)]


async def test_concurrent_first_requests_after_a_restart_load_once(tmp_path):
    state = tmp_path / "state"
    async with full_gateway(state) as first:
        source = make_adapter(tmp_path / "src")
        await first.client.post("/v1/adapters", json={"name": "cold", "path": str(source)}, headers=first.admin)
    async with full_gateway(state) as second:
        entry = second.registry.find("", "cold")
        assert not entry.accepted and entry.adapter_id not in second.engine.added
        responses = await asyncio.gather(*(complete(second, "cold") for _ in range(8)))
        assert all(r.status_code == 200 for r in responses)
        # add_lora checked the stored files once, before any request reached a batch.
        assert second.engine.added.count(entry.adapter_id) == 1 and second.engine.reloaded == []


async def test_stored_files_the_engine_refuses_after_a_restart_get_a_4xx(tmp_path):
    state = tmp_path / "state"
    async with full_gateway(state) as first:
        source = make_adapter(tmp_path / "src")
        await first.client.post("/v1/adapters", json={"name": "hurt", "path": str(source)}, headers=first.admin)
    engine = FakeEngine(cache_size=3)
    async with full_gateway(state, engine=engine) as second:
        engine.refuse_all = True  # as add_lora refuses a damaged file
        refused = await complete(second, "hurt")
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_adapter"
        assert str(state) not in refused.text
        assert engine.generated == []  # it never reached a batch
        engine.refuse_all = False
        assert (await complete(second, "hurt")).status_code == 200


async def test_replace_is_atomic_and_old_requests_finish_on_the_old_version(full, tmp_path):
    old_source, new_source = make_adapter(tmp_path / "v1", seed=1), make_adapter(tmp_path / "v2", seed=2)
    await full.client.post("/v1/adapters", json={"name": "r", "path": str(old_source)}, headers=full.admin)
    old_id = full.registry.find("", "r").adapter_id
    full.engine.release = asyncio.Event()
    in_flight = asyncio.create_task(complete(full, "r"))
    await asyncio.sleep(0.05)
    replaced = await full.client.post("/v1/adapters", json={"name": "r", "path": str(new_source)}, headers=full.admin)
    assert replaced.status_code == 201
    new_id = full.registry.find("", "r").adapter_id
    assert new_id != old_id and old_id not in full.engine.removed  # still in use
    full.engine.release.set()
    assert (await in_flight).status_code == 200
    assert full.engine.generated[0][3].adapter_id == old_id
    assert old_id in full.engine.removed
    after = await complete(full, "r")
    assert full.engine.generated[-1][3].adapter_id == new_id and after.status_code == 200


async def test_delete_lets_requests_in_flight_finish(full, tmp_path):
    await full.client.post(
        "/v1/adapters", json={"name": "d", "path": str(make_adapter(tmp_path / "d"))}, headers=full.admin
    )
    full.engine.release = asyncio.Event()
    in_flight = asyncio.create_task(complete(full, "d", stream=True))
    await asyncio.sleep(0.05)
    assert (await full.client.delete("/v1/adapters/d", headers=full.admin)).status_code == 200
    assert (await complete(full, "d")).status_code == 404
    full.engine.release.set()
    finished = await in_flight
    assert (
        finished.status_code == 200
        and finished.text.rstrip().endswith("data: [DONE]")
        and '"error"' not in finished.text
    )


async def test_adapter_dir_registers_on_first_use(tmp_path):
    adapter_dir = tmp_path / "dir"
    make_adapter(adapter_dir / "lazy")
    make_adapter(adapter_dir / "broken", config_overrides={"peft_type": "IA3"})
    async with full_gateway(tmp_path / "state", adapter_dir=adapter_dir) as gw:
        assert gw.registry.find("", "lazy") is None
        assert (await complete(gw, "lazy")).status_code == 200
        assert gw.registry.find("", "lazy") is not None
        broken = await complete(gw, "broken")
        assert broken.status_code == 400 and "only LORA" in broken.json()["error"]["message"]
        assert (await complete(gw, "absent")).status_code == 404
        assert (await complete(gw, "..")).status_code == 404

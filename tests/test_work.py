"""adapters/work.py: slow adapter work in a pool of its own, sandbox slots taken before a thread.

And through the whole app (FakeEngine, real store and catalog, real sandbox): while one tenant's
ten MiniMind uploads wait for the converter, another tenant's listings answer at once. With the
conversions on the default thread pool, as before, they filled it, and a file listing waited
seconds for a thread.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import pytest
import torch

from adapters import convert
from adapters.errors import ConverterBusy
from adapters.work import WorkPool
from tests.conftest import full_gateway
from tests.races import cancel_as_it_takes_the_slot
from tests.routes.test_tenancy import new_tenant
from tests.security.tenant_world import tiny_base


async def test_work_waiting_for_a_sandbox_slot_holds_no_thread():
    pool = WorkPool(threads=2, sandbox_slots=1)
    release = threading.Event()
    running = []

    def convert(i: int) -> int:
        running.append(i)
        release.wait(10)
        return i

    conversions = [asyncio.create_task(pool.run_sandboxed(convert, i)) for i in range(5)]
    while pool.sandbox_waiting != 4:
        await asyncio.sleep(0.01)
    assert len(running) == 1
    # The pool's other thread is free for fast work, and the default pool was never used.
    assert await asyncio.wait_for(pool.run(lambda: "quick"), 2) == "quick"
    release.set()
    assert sorted(await asyncio.gather(*conversions)) == [0, 1, 2, 3, 4]
    pool.close()


async def test_a_slot_is_held_until_its_work_ends_even_when_its_caller_left():
    pool = WorkPool(threads=2, sandbox_slots=1, sandbox_wait_seconds=0.2)
    release = threading.Event()
    first = asyncio.create_task(pool.run_sandboxed(release.wait, 10))
    await asyncio.sleep(0.05)
    first.cancel()  # the client went away; its child runs on
    with pytest.raises(ConverterBusy, match="1 converters"):
        await pool.run_sandboxed(lambda: None)
    release.set()
    await asyncio.sleep(0.05)
    assert await pool.run_sandboxed(lambda: "free again") == "free again"
    pool.close()


async def test_a_caller_cancelled_as_its_slot_frees_leaves_and_frees_the_slot():
    """The race that asyncio.wait_for (3.11) loses: the slot is acquired, and the caller is
    cancelled before it sees that. wait_for swallowed the cancel, and the caller ran on as if its
    client were there; it must end cancelled, and the slot be free again once its work ends."""
    pool = WorkPool(threads=1, sandbox_slots=1)
    await cancel_as_it_takes_the_slot(pool._sandbox, pool.run_sandboxed(lambda: "ran"))
    assert await asyncio.wait_for(pool.run_sandboxed(lambda: "free"), 2) == "free"
    pool.close()


def minimind_pth(tmp_path) -> bytes:
    """A MiniMind save_lora file for the tiny test base (hidden size 64)."""
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for module in ("q_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{module}.lora"
        tensors[f"{key}.A.weight"] = torch.randn(4, 64, generator=generator)
        tensors[f"{key}.B.weight"] = torch.randn(64, 4, generator=generator)
    torch.save(tensors, tmp_path / "lora.pth")
    return (tmp_path / "lora.pth").read_bytes()


# A MiniMind file this small converts in a few hundredths of a second; a large one takes seconds.
# Each conversion here holds its thread this long first, as a large file's would, so that a call
# queued behind the conversions would show.
CONVERSION_SECONDS = 2.0


async def test_ten_slow_minimind_uploads_leave_another_tenants_listings_fast(tmp_path, monkeypatch):
    pth = minimind_pth(tmp_path)
    real_load = convert.load_pickled_tensors

    def slow_load(*args, **kwargs):
        time.sleep(CONVERSION_SECONDS)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(convert, "load_pickled_tensors", slow_load)
    async with full_gateway(tmp_path / "state", model=str(tiny_base(tmp_path / "base")), max_training_jobs=0) as gw:
        uploader = gw.as_(await new_tenant(gw, "uploader", max_concurrent=10))
        reader = gw.as_(await new_tenant(gw, "reader", requests_per_second=1000))

        async def upload(i: int):
            data = {"name": f"mm{i}", "format": "minimind"}
            return await gw.client.post(
                "/v1/adapters", data=data, files=[("file", ("lora.pth", pth))], headers=uploader
            )

        uploads = [asyncio.create_task(upload(i)) for i in range(10)]
        await asyncio.sleep(0.5)  # the uploads are read, and wait for the converter's two slots
        latencies: dict[str, list[float]] = {"/v1/models": [], "/v1/files": []}
        while not all(task.done() for task in uploads):
            for path, samples in latencies.items():
                started = time.perf_counter()
                response = await gw.client.get(path, headers=reader)
                samples.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
            await asyncio.sleep(0.02)
        answers = await asyncio.gather(*uploads)
    assert [r.status_code for r in answers] == [201] * 10, [r.text for r in answers]
    shown = {path: (len(s), round(statistics.median(s), 3), round(max(s), 3)) for path, s in latencies.items()}
    print("samples, median s, max s:", shown)
    for samples in latencies.values():
        assert len(samples) >= 3, shown
        # The 99th percentile, not the one slowest call: beside the other worker's engine under
        # make test, one call in 400 took 1.6 s; a shared pool held each for whole conversions.
        assert statistics.quantiles(samples, n=100, method="inclusive")[98] < CONVERSION_SECONDS / 2, shown

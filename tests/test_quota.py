"""Quotas in the catalog, on SQLite and a real PostgreSQL: two catalogs on one database (two
gateways) writing from many threads at once never pass a limit, since each limit is counted in the
transaction that writes the row. And adapters/quota.py's reservations, in one process."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters.batches_db import VALIDATING, BatchQuotaExceeded, BatchRecords, BatchRow
from adapters.database import AdapterRow, BaseIdentity, Database
from adapters.errors import QuotaExceeded, StorageQuotaExceeded
from adapters.fine_tuning_db import FileRow, FineTuningRecords, JobRow
from adapters.quota import Reservations

BASE = BaseIdentity("base", "f" * 64)
WRITERS = 20


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogs(request, tmp_path):
    """Two catalogs on one database, as two gateways have; tenant 'acme' exists."""
    url = f"sqlite:///{tmp_path / 'catalog.sqlite3'}" if request.param == "sqlite" else None
    url = url or request.getfixturevalue("postgres_url")
    first, second = Database(url, BASE), Database(url, BASE)
    assert first.add_tenant("acme", {})
    yield first, second
    first.close()
    second.close()


def at_once(calls) -> list[BaseException | None]:
    """Run the calls from as many threads at once; what each raised (None: it succeeded)."""

    def run(call):
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - the test looks at each
            return exc
        return None

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def adapter(name: str, pinned: bool = False) -> AdapterRow:
    return AdapterRow("acme", name, "c" * 64, 8, ("q_proj",), 100, pinned, time.time())


def test_adapters_written_at_once_through_two_catalogs_stop_at_max_adapters(catalogs):
    calls = [lambda i=i: catalogs[i % 2].put_adapter(adapter(f"a{i}"), None, 2) for i in range(WRITERS)]
    outcomes = at_once(calls)
    assert sum(outcome is None for outcome in outcomes) == 2, outcomes
    assert all(isinstance(o, QuotaExceeded) and o.limit == "max_adapters" for o in outcomes if o is not None)
    assert len(catalogs[0].adapters()) == 2
    # Replacing a name it has is no new adapter; a third name still is.
    kept = catalogs[1].adapters()[0].name
    catalogs[1].put_adapter(adapter(kept), None, 2)
    with pytest.raises(QuotaExceeded):
        catalogs[1].put_adapter(adapter("third"), None, 2)


def test_pins_at_once_stop_at_max_pinned_and_at_the_tenants_share(catalogs):
    for i in range(6):
        catalogs[0].put_adapter(adapter(f"a{i}"))
    outcomes = at_once(
        [
            lambda i=i: catalogs[i % 2].set_pinned("acme", f"a{i % 6}", True, max_pinned=3, max_tenant_pins=8)
            for i in range(WRITERS)
        ]
    )
    assert sum(r.pinned for r in catalogs[0].adapters()) == 3, outcomes
    assert catalogs[0].add_tenant("other", {})
    catalogs[0].put_adapter(AdapterRow("other", "b", "d" * 64, 8, ("q_proj",), 100, False, time.time()))
    with pytest.raises(QuotaExceeded, match="half of --max-cpu-loras"):
        catalogs[1].set_pinned("other", "b", True, max_pinned=1, max_tenant_pins=3)


def test_files_written_at_once_through_two_catalogs_stop_at_max_file_bytes(catalogs):
    records = [FineTuningRecords(catalog) for catalog in catalogs]

    def file(i: int) -> FileRow:
        return FileRow(f"file-{i}", "acme", "t.jsonl", "fine-tune", 700, "e" * 64, {}, time.time())

    outcomes = at_once([lambda i=i: records[i % 2].add_file(file(i), 1000) for i in range(10)])
    assert sum(outcome is None for outcome in outcomes) == 1, outcomes
    assert all(isinstance(o, StorageQuotaExceeded) for o in outcomes if o is not None)
    assert records[0].file_bytes("acme") == 700


def test_jobs_written_at_once_through_two_catalogs_stop_at_max_queued_jobs(catalogs):
    records = [FineTuningRecords(catalog) for catalog in catalogs]

    def job(i: int) -> JobRow:
        return JobRow(f"ftjob-{i}", "acme", "base", "validating_files", {}, time.time())

    outcomes = at_once([lambda i=i: records[i % 2].add_job(job(i), 2) for i in range(30)])
    assert sum(outcome is None for outcome in outcomes) == 2, outcomes
    assert all(isinstance(o, QuotaExceeded) and o.limit == "max_queued_jobs" for o in outcomes if o is not None)
    assert records[1].count_waiting("acme") == 2


async def test_reservations_count_work_under_way_and_give_it_back():
    reservations = Reservations()
    used = 0
    entered = asyncio.Event()
    leave = asyncio.Event()

    def refuse(in_use: int) -> QuotaExceeded:
        return QuotaExceeded(f"{in_use} in use", limit="max_adapters")

    async def take():
        async with reservations.hold("acme", 1, 2, lambda: used, refuse):
            entered.set()
            await leave.wait()

    holders = [asyncio.create_task(take()) for _ in range(2)]
    await entered.wait()
    await asyncio.sleep(0)
    assert reservations.held("acme") == 2
    with pytest.raises(QuotaExceeded, match="2 in use"):
        async with reservations.hold("acme", 1, 2, lambda: used, refuse):
            pass
    async with reservations.hold("other", 1, 2, lambda: used, refuse):  # another owner's limit is its own
        pass
    leave.set()
    await asyncio.gather(*holders)
    assert reservations.held("acme") == 0
    async with reservations.hold("acme", 1, None, lambda: 10**9, refuse):  # no limit: nothing counted
        assert reservations.held("acme") == 0


def test_batches_written_at_once_through_two_catalogs_stop_at_their_limits(catalogs):
    records = [BatchRecords(catalog) for catalog in catalogs]

    def batch(i: int, lines: int) -> BatchRow:
        now = time.time()
        return BatchRow(f"batch_{i}", "acme", "/v1/completions", "file-x", "24h", VALIDATING, lines, now, now + 86400)

    outcomes = at_once([lambda i=i: records[i % 2].add(batch(i, 10), 3, 10_000) for i in range(WRITERS)])
    assert sum(outcome is None for outcome in outcomes) == 3, outcomes
    assert all(isinstance(o, BatchQuotaExceeded) for o in outcomes if o is not None)
    outcomes = at_once([lambda i=i: records[i % 2].add(batch(100 + i, 10), 100, 50) for i in range(WRITERS)])
    assert sum(outcome is None for outcome in outcomes) == 2, outcomes  # 30 lines kept + 2 × 10 = 50

"""adapters/responses_db.py on SQLite and on a real PostgreSQL: the count limit holds across catalogs
written at once, expired responses go, and a tenant's deletion takes its responses."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters.database import Database
from adapters.responses_db import ResponseRecords, ResponsesQuotaExceeded, StoredResponse
from adapters.retention import purge_tenant
from tests.test_database import BASE_A


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite3'}"
    return request.getfixturevalue("postgres_url")


def stored(response_id: str, owner: str = "acme", expires_at: float | None = None) -> StoredResponse:
    now = time.time()
    return StoredResponse(
        response_id, owner, now, expires_at or now + 3600, {"id": response_id, "output": []}, [{"id": "m"}], []
    )


def test_two_gateways_storing_at_once_stay_within_the_tenants_limit(url):
    catalogs = [Database(url, BASE_A), Database(url, BASE_A)]
    catalogs[0].add_tenant("acme", {})
    records = [ResponseRecords(catalog) for catalog in catalogs]

    def add(index: int) -> bool:
        try:
            records[index % 2].add(stored(f"resp_{index}"), 3, time.time())
        except ResponsesQuotaExceeded as exc:
            assert "max_stored_responses" in exc.message
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(add, range(16)))
    assert sum(outcomes) == 3
    assert records[1].count("acme", time.time()) == 3
    for catalog in catalogs:
        catalog.close()


def test_expired_responses_are_not_served_and_are_pruned_and_a_deleted_tenant_takes_its_own(url):
    catalog = Database(url, BASE_A)
    catalog.add_tenant("acme", {})
    records = ResponseRecords(catalog)
    records.add(stored("resp_old", expires_at=time.time() - 1), None, time.time() - 10)
    records.add(stored("resp_new"), None, time.time() - 10)
    assert records.get("resp_old", time.time()) is None
    assert records.get("resp_new", time.time()).conversation == [{"id": "m"}]
    assert records.prune(time.time()) == 1
    purge_tenant(catalog, "acme")
    assert records.get("resp_new", time.time()) is None
    catalog.close()

"""The catalog at scale: what one catalog sync step costs, and how fast adapters register.

`sync`: a catalog (SQLite, or PostgreSQL with --catalog-url) holding --adapters rows, and this
process's registry, tenants and key ring in step with it, as a gateway's are. Another writer then
registers one adapter at a time, and each step of the catalog sync (server/ops/catalog_sync.py)
that applies it is timed: the incremental step (the change log's rows) and the full snapshot a
gateway falls back to (what every step cost before the change log), medians over --steps.

    python -m bench.catalog_scale sync --adapters 10000

`register`: --count adapters generated for a base (bench/adapter_gen.py) are uploaded to a running
gateway (POST /v1/adapters, multipart) by --clients clients at once; each round uses new names and
deletes them after. Prints seconds per round and the median.

    python -m bench.catalog_scale register --url http://127.0.0.1:8000 --admin-key KEY \\
        --base ~/.cache/lora-gateway/demo/base --count 1000 --clients 8 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.adapter_gen import generate

# -- sync --------------------------------------------------------------------------------------


class _NoEngine:
    """Registry bookkeeping only: sync steps never load an adapter."""

    async def add_adapter(self, handle) -> None:  # noqa: ANN001 - the AdapterEngine protocol
        return None

    async def remove_adapter(self, adapter_id: int) -> None:
        return None


async def sync_costs(catalog_url: str | None, adapters: int, steps: int, root: Path) -> dict[str, Any]:
    """Median seconds of one incremental sync step and of one full-snapshot step, with `adapters` rows."""
    from adapters.catalog_changes import read_changes
    from adapters.database import AdapterRow, BaseIdentity, Database, adapters_table
    from adapters.registry import Registry
    from adapters.spec import SHARED
    from adapters.store import AdapterStore
    from server.http.auth import KeyRing
    from server.http.tenancy import TenantLimits, Tenants
    from server.ops.catalog_sync import CatalogSync

    url = catalog_url or f"sqlite:///{root / 'catalog.sqlite3'}"
    base = BaseIdentity("bench", "b" * 64)
    writer, reader = Database(url, base), Database(url, base)
    content_hash = "c" * 64  # one stored folder that every row names: rows, not files, are measured
    store = AdapterStore(root / "store")
    store.path_for(content_hash).mkdir(parents=True, exist_ok=True)
    existing = len(reader.adapters())
    rows = [
        {"base_fingerprint": base.fingerprint, "base_model": base.served_name, "owner": SHARED}
        | {"name": f"row-{index:05d}", "content_hash": content_hash, "rank": 8, "target_modules": '["q_proj"]'}
        | {"size_bytes": 1000, "pinned": False, "created_at": time.time()}
        for index in range(existing, adapters)
    ]
    if rows:  # in one transaction: filling the catalog is not what is measured
        with writer.raw_engine.begin() as conn:
            conn.execute(adapters_table.insert(), rows)
    registry = Registry(
        _NoEngine(), base_name="bench-base", base_adapter=None, max_resident=16, catalog=reader, store=store
    )
    await registry.start()
    sync = CatalogSync(reader, registry, Tenants(reader, TenantLimits()), KeyRing(reader, None, None), 1.0)
    await sync.check()
    incremental, snapshot = [], []
    for step in range(steps):
        row = AdapterRow(SHARED, f"new-{time.time_ns()}-{step}", content_hash, 8, ("q_proj",), 1000, False, time.time())
        writer.put_adapter(row)
        started = time.perf_counter()
        assert await sync.check()
        incremental.append(time.perf_counter() - started)
        writer.put_adapter(row.__class__(**{**row.__dict__, "pinned": True}))
        started = time.perf_counter()
        await sync._apply_snapshot()
        snapshot.append(time.perf_counter() - started)
    read_changes(reader, sync.seen_version)  # the catalog is in step again
    rows = len(registry.entries())
    writer.close()
    reader.close()
    inc, full = statistics.median(incremental), statistics.median(snapshot)
    return {
        "catalog": "postgresql" if url.startswith("postgres") else "sqlite",
        "adapters": rows,
        "steps": steps,
        "incremental_step_ms": round(inc * 1000, 3),
        "snapshot_step_ms": round(full * 1000, 3),
        "ratio": round(full / inc, 1),
    }


# -- register ----------------------------------------------------------------------------------


def multipart(name: str, folder: Path) -> tuple[bytes, str]:
    """The form an upload sends: a `name` field and the folder's files, as one body."""
    boundary = "bench-" + uuid.uuid4().hex
    parts = [f'--{boundary}\r\ncontent-disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()]
    for path in sorted(folder.iterdir()):
        head = f'--{boundary}\r\ncontent-disposition: form-data; name="file"; filename="{path.name}"\r\n'
        parts.append(head.encode() + b"content-type: application/octet-stream\r\n\r\n" + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


async def register_round(
    url: str, headers: dict[str, str], folders: list[Path], clients: int, prefix: str
) -> tuple[float, int]:
    """Seconds to upload every folder with `clients` at once; then deletes them. Returns (seconds, failures)."""
    # Encoded before the clock starts: the client's own CPU would otherwise be measured too.
    bodies = [multipart(f"{prefix}-{index:04d}", folder) for index, folder in enumerate(folders)]
    queue = list(enumerate(bodies))
    queue.reverse()
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while queue:
            index, (body, content_type) = queue.pop()
            response = await http.post("/v1/adapters", content=body, headers={"content-type": content_type})
            if response.status_code != 201:
                failures += 1
                if failures <= 3:
                    print(f"registering {prefix}-{index:04d}: HTTP {response.status_code}: {response.text[:300]}")

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
        deletions = [f"{prefix}-{index:04d}" for index in range(len(folders))]
        for start in range(0, len(deletions), 32):
            await asyncio.gather(*(http.delete(f"/v1/adapters/{name}") for name in deletions[start : start + 32]))
    return seconds, failures


async def register_rounds(args: argparse.Namespace) -> dict[str, Any]:
    folders = generate(args.base.expanduser(), args.adapters_dir, args.count)
    headers = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    rounds = []
    for index in range(args.rounds):
        seconds, failures = await register_round(
            args.url, headers, folders, args.clients, f"reg{index}-{time.time_ns()}"
        )
        print(f"round {index + 1}: {len(folders)} registrations in {seconds:.2f} s ({failures} failed)")
        rounds.append({"seconds": round(seconds, 3), "failures": failures})
    median = statistics.median(r["seconds"] for r in rounds)
    return {
        "count": len(folders),
        "clients": args.clients,
        "rounds": rounds,
        "median_s": round(median, 3),
        "per_registration_ms": round(median / len(folders) * 1000, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.catalog_scale", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    sync = modes.add_parser("sync", help="the cost of one catalog sync step, incremental and full")
    sync.add_argument("--adapters", type=int, default=10_000, help="rows in the catalog (default 10000)")
    sync.add_argument("--steps", type=int, default=20, help="registrations applied, one per step (default 20)")
    sync.add_argument("--catalog-url", help="a PostgreSQL catalog to fill and use; default: a new SQLite file")
    register = modes.add_parser("register", help="registrations over HTTP against a running gateway")
    register.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    register.add_argument("--admin-key", help="the gateway's --admin-key (none in open mode)")
    register.add_argument("--base", type=Path, required=True, help="the gateway's base model folder (config.json)")
    register.add_argument("--count", type=int, default=1000, help="adapters per round (default 1000)")
    register.add_argument("--clients", type=int, default=8, help="uploads in flight at once (default 8)")
    register.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default 3)")
    register.add_argument(
        "--adapters-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-adapters", help="generated adapters"
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.mode == "sync":
        with tempfile.TemporaryDirectory() as root:
            result = asyncio.run(sync_costs(args.catalog_url, args.adapters, args.steps, Path(root)))
    else:
        result = asyncio.run(register_rounds(args))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

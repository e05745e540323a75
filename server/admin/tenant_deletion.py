"""Deleting a tenant: every row it owns, then what each gateway holds of it, then its stored bytes.

1. The catalog, in one transaction (adapters/retention.py): the tenant, its keys, adapters on
   every base, files, fine-tuning jobs with their events and checkpoints. When the database
   cannot be reached nothing changes, and the answer is 503 catalog_unavailable.
2. This gateway forgets it at once: keys, adapters, composed merges, usage; its jobs running
   here stop. Every other gateway does the same when its catalog sync sees the tenant gone
   (`on_tenant_gone`), and a job running there stops when its watcher finds its row gone, within
   about a second. A job that finishes meanwhile registers nothing: its adapter's row is written
   only while its job's row is there (FineTuningRecords.running_job_guard).
3. The bytes: its files' and checkpoints' objects, and adapter and merge content no other row
   names (StoreSweep.remove_purged). When the store cannot be reached the tenant is deleted all
   the same, and the answer is a 503 that says so; the periodic sweep removes what is left.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.datastructures import State

from adapters.errors import Unavailable
from server.http.errors import GatewayError

logger = logging.getLogger(__name__)

JOB_STOP_SECONDS = 10.0


class DeletionIncomplete(GatewayError):
    """The tenant is deleted, but some of its stored bytes could not be removed yet."""

    status_code = 503
    error_type = "service_unavailable_error"
    code = "store_unavailable"


def held_hashes(state: State) -> set[str]:
    """Content this gateway may still load from its store: its registry's, and its cached merges'."""
    held = state.registry.held_hashes()
    merged = getattr(state, "merged_adapters", None)
    if merged is not None:
        held |= merged.held_hashes()
    return held


async def forget_tenant(state: State, name: str) -> set[str]:
    """Drop what this gateway alone holds of a deleted tenant; returns its merges' content hashes."""
    merged = getattr(state, "merged_adapters", None)
    released = await merged.drop_owner(name) if merged is not None else set()
    state.usage.forget(name)
    return released


async def on_tenant_gone(state: State, name: str) -> None:
    """The catalog sync's hook: a tenant deleted through another gateway (or deleted and made again)."""
    released = await forget_tenant(state, name)
    sweep = getattr(state, "store_sweep", None)
    if sweep is None:
        return
    try:
        await asyncio.to_thread(sweep.collect_local, held_hashes(state))
    except Unavailable:
        logger.warning("tenant %s: its cached files are left for the store sweep", name)
    logger.info("tenant %s was deleted through another gateway (%d merges dropped)", name, len(released))


async def delete_tenant(state: State, name: str) -> dict[str, Any]:
    """Delete tenant `name` and everything it owns; the admin's DELETE /v1/tenants/{name}."""
    purged = await state.tenants.delete(name)
    state.keyring.forget_tenant(name)
    await state.registry.drop_owner(name)
    released = await forget_tenant(state, name)
    fine_tuning = getattr(state, "fine_tuning", None)
    if fine_tuning is not None:
        stopping = [job_id for job_id in purged.running_jobs if fine_tuning.scheduler.stop_job(job_id)]
        for job_id in stopping:
            await fine_tuning.scheduler.wait_finished(job_id, JOB_STOP_SECONDS)
    pending = 0
    if (sweep := getattr(state, "store_sweep", None)) is not None:
        pending = await asyncio.to_thread(sweep.remove_purged, purged, released, held_hashes(state))
    logger.info(
        "deleted tenant %s: %d adapters, %d files, %d fine-tuning jobs, %d merges",
        name,
        purged.adapters,
        len(purged.file_ids),
        purged.jobs,
        len(released),
    )
    if pending:
        raise DeletionIncomplete(
            f"tenant '{name}' is deleted, but {pending} of its stored objects could not be removed because the "
            "adapter store is unreachable; the store sweep removes them once it is back"
        )
    return {
        "name": name,
        "object": "tenant",
        "deleted": True,
        "removed": {
            "adapters": purged.adapters,
            "files": len(purged.file_ids),
            "fine_tuning_jobs": purged.jobs,
            "checkpoints": len(purged.checkpoint_keys),
            "merges": len(released),
        },
    }

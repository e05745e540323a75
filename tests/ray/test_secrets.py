"""Under Ray, too, no secret reaches a process that does not need it.

The gateway starts with an admin key on its command line and a metrics key, a store credential
and a hub token in its environment (tests/ray/conftest.py). Ray's own processes (its node, the
ingress and the engine replicas) start from the gateway's environment, and each replica spawns
vLLM's engine processes: the settings reach the replicas as an argument, so only the store's
credential may stay in Ray's processes (a replica opens the store with it), and the engines
inherit none of them.
"""

from __future__ import annotations

from pathlib import Path

import psutil

from tests.engine.conftest import ADMIN_KEY
from tests.ray.conftest import SECRET_ENV, engine_processes, engine_replicas_under, wait_for_healthy_replicas


def proc_text(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def gateway_processes(marker: str) -> list[psutil.Process]:
    """The gateway's process and every process below it (Ray's node, its workers, the engines)."""
    roots = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or ())]
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            found[root.pid] = root
            found.update((child.pid, child) for child in root.children(recursive=True))
        except psutil.Error:
            pass
    return list(found.values())


def shown(process: psutil.Process, canaries: list[str]) -> list[str]:
    try:
        text = proc_text(process.pid, "cmdline") + proc_text(process.pid, "environ")
    except (OSError, psutil.Error):
        return []  # gone meanwhile
    return [canary for canary in canaries if canary in text]


def test_engines_under_ray_inherit_no_secret_and_ray_only_the_store_credential(ray_gateway):
    # A replica replaced by an earlier test (Serve restarts one whose health check fails) runs no
    # engine until it is healthy again.
    wait_for_healthy_replicas(ray_gateway.url, 2, 240)
    processes = gateway_processes(ray_gateway.marker)
    per_replica = {replica.pid: engine_processes(replica) for replica in engine_replicas_under(ray_gateway.marker)}
    assert sum(1 for found in per_replica.values() if found) >= 2, f"one engine per replica expected: {per_replica}"
    engines = [process for found in per_replica.values() for process in found]

    every_secret = [ADMIN_KEY, *SECRET_ENV.values()]
    leaks = {p.pid: found for p in engines if (found := shown(p, every_secret))}
    assert leaks == {}, "secrets in an engine's environment or command line"

    not_the_store = [ADMIN_KEY, SECRET_ENV["LORA_GATEWAY_METRICS_KEY"], SECRET_ENV["HF_TOKEN"]]
    others = [p for p in processes if p.pid != ray_gateway.process.pid]
    leaks = {f"{p.pid} {' '.join(p.cmdline())[:60]}": found for p in others if (found := shown(p, not_the_store))}
    assert leaks == {}, "secrets other than the store's credential in Ray's processes"

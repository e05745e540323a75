"""One engine replica on Ray Serve: the gateway's vLLM engine, with its plugins, and a small
adapter loader multiplexed by content hash.

Replicas are thin: tenancy, validation and the catalog stay in the ingress. A replica loads an
adapter on its first request for it, from the shared store into its local cache (checked
against the hash), and keeps at most --max-cpu-loras: when Serve's multiplexer evicts one, it
leaves the engine too, so Serve's LRU and vLLM's agree.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from adapters.engine import AdapterHandle
from server.config import Settings
from server.engine.protocol import GenerationStep, SamplingOptions

logger = logging.getLogger(__name__)

# Set in a replica before its engine starts, so that the engine's processes carry their owner.
OWNER_ENV = "LORA_GATEWAY_ENGINE_OWNER"
REAP_EVERY_REPORTS = 10
BOARD_NAME = "lora-gateway-cluster"
BOARD_NAMESPACE = "lora-gateway"
REPORT_SECONDS = 1.0


class LoadedAdapter:
    """An adapter this replica's engine holds; Serve calls `__del__` when it evicts it."""

    def __init__(self, engine: Any, handle: AdapterHandle, loaded: dict[str, AdapterHandle]):
        self.engine = engine
        self.handle = handle
        self._loaded = loaded
        self._loop = asyncio.get_running_loop()
        self._released = False

    def __del__(self) -> None:
        # Serve's multiplexer calls this from a worker thread on eviction; the garbage collector
        # may call it again later. Either way the engine drops the adapter once, on its loop.
        if self._released:
            return
        self._released = True
        self._loaded.pop(self.handle.content_hash, None)
        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.engine.remove_adapter(self.handle.adapter_id), self._loop)


def replica_class(max_adapters: int) -> type:
    """The replica class, with Serve's per-replica adapter bound fixed at class creation."""

    class EngineReplica:
        """A gateway engine replica: generate, load adapters by content hash, report itself."""

        def __init__(self, settings: Settings):
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            from adapters.store import open_adapter_store
            from server.engine.vllm_engine import UNBOUND, VllmEngine
            from server.ops.isolation import withhold_secrets

            self.settings = settings
            self.store = open_adapter_store(
                settings.store_url, settings.state_dir / "adapters", settings.max_adapter_bytes
            )
            # The store's client holds its credentials now: the engine's processes, spawned from
            # this one, inherit an environment without any secret (the owner mark below is set after).
            withhold_secrets()
            # Replicas share a node's cores: vLLM's default pinning would put them all on core 0.
            os.environ.setdefault(*UNBOUND)
            # Ray kills a failed replica, not the engine processes it spawned; mark ours, and
            # clear away those of replicas that died before.
            os.environ[OWNER_ENV] = str(os.getpid())
            reap_orphaned_engines()
            context = serve.get_replica_context()
            self.replica_id = context.replica_id.unique_id
            # vLLM's series go out through Ray's metrics export, tagged with this replica's id.
            self.engine = VllmEngine.start(
                self.settings, self.settings.model or "", stat_loggers=[RayPrometheusStatLogger]
            )
            self._ids = itertools.count(1)
            self.loaded: dict[str, AdapterHandle] = {}
            self.in_flight = 0
            self.started_at = time.time()
            self._reporter = asyncio.get_event_loop().create_task(self._report_forever())
            logger.info("engine replica %s ready", self.replica_id)

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, content_hash: str) -> LoadedAdapter:
            path = await asyncio.to_thread(self.store.ensure_local, content_hash)
            adapter_id = next(self._ids)
            handle = AdapterHandle(adapter_id, f"{content_hash[:16]}@{adapter_id}", str(path), content_hash)
            await self.engine.add_adapter(handle)
            self.loaded[content_hash] = handle
            return LoadedAdapter(self.engine, handle, self.loaded)

        async def _handle(self) -> AdapterHandle | None:
            content_hash = serve.get_multiplexed_model_id()
            return (await self.adapter(content_hash)).handle if content_hash else None

        async def load(self) -> str:
            """Load the request's adapter (its multiplexed id); the engine's refusal is raised."""
            await self._handle()
            return self.replica_id

        async def generate(
            self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions
        ) -> AsyncIterator[GenerationStep]:
            adapter = await self._handle()
            self.in_flight += 1
            try:
                async for step in self.engine.generate(request_id, prompt_token_ids, options, adapter):
                    step.replica = self.replica_id
                    yield step
            finally:
                self.in_flight -= 1

        def info(self) -> dict[str, Any]:
            import ray

            return {
                "id": self.replica_id,
                "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(),
                "resident_adapters": sorted(self.loaded),
                "in_flight": self.in_flight,
                "healthy": self.engine.is_healthy,
                "started_at": self.started_at,
            }

        async def check_health(self) -> None:
            # Serve replaces a replica whose check fails; a dead engine core never recovers.
            if not self.engine.is_healthy:
                self.engine.fail_in_flight()  # its streams end now, not when Serve stops the replica
                raise RuntimeError("the engine of this replica has died")

        async def _report_forever(self) -> None:
            import ray

            board = None
            for count in itertools.count(1):
                if count % REAP_EVERY_REPORTS == 0:
                    await asyncio.to_thread(reap_orphaned_engines)
                try:
                    if board is None:
                        board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
                    await board.report.remote(self.info())
                except Exception:  # noqa: BLE001 - the board may be starting or gone; the view only
                    board = None
                await asyncio.sleep(REPORT_SECONDS)

    return EngineReplica


def reap_orphaned_engines(proc: Path = Path("/proc")) -> int:
    """Kill engine processes whose replica is gone; returns how many. Linux only, else nothing."""
    if not proc.is_dir():
        return 0
    marker = OWNER_ENV.encode() + b"="
    killed = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        owner = next((item[len(marker) :] for item in environ if item.startswith(marker)), None)
        if owner is None or not owner.isdigit() or _alive(int(owner)):
            continue
        try:
            os.kill(int(entry.name), signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    if killed:
        logger.warning("stopped %d engine processes left behind by a replica that died", killed)
    return killed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClusterBoard:
    """What each replica last reported of itself, for GET /v1/cluster (a named Ray actor)."""

    STALE_SECONDS = 3.0  # three missed reports
    FORGET_SECONDS = 60.0

    def __init__(self):
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}

    def report(self, info: dict[str, Any]) -> None:
        self._reports[info["id"]] = (time.time(), info)

    def snapshot(self) -> list[dict[str, Any]]:
        now = time.time()
        self._reports = {k: v for k, v in self._reports.items() if now - v[0] < self.FORGET_SECONDS}
        replicas = []
        for reported_at, info in sorted(self._reports.values(), key=lambda item: item[1]["started_at"]):
            fresh = now - reported_at < self.STALE_SECONDS
            replicas.append({**info, "healthy": bool(info["healthy"] and fresh), "reported_at": reported_at})
        return replicas

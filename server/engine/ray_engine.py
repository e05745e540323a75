"""The Engine protocol over Ray Serve engine replicas, for the ingress.

An adapter request goes through a handle whose multiplexed model id is the adapter's content
hash, so Serve sends it to a replica that holds those files (a replaced adapter has a new
hash, hence a new id). Base-model requests carry no id and are load-balanced. The tokenizer
runs here, in the ingress, from the same model folder the replicas load.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors
from ray.serve.handle import DeploymentHandle

from adapters.engine import AdapterLoadFailed
from server.engine.protocol import AdapterHandle, EngineDead, EngineRejected, GenerationStep, SamplingOptions
from server.engine.tokens import Tokenizing

logger = logging.getLogger(__name__)

# Each .options() builds a new handle; keep one per adapter version, the newest ones.
MAX_CACHED_HANDLES = 4096

REPLICA_LOST = (
    ray_errors.RayActorError,
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.ObjectLostError,
    serve_errors.DeploymentUnavailableError,
    serve_errors.ReplicaUnavailableError,
    serve_errors.BackPressureError,
)


class RayEngine(Tokenizing):
    """Engine replicas behind one DeploymentHandle."""

    def __init__(self, replicas: DeploymentHandle, tokenizer: Any, max_model_len: int, board: Any = None):
        self._replicas = replicas
        self._streaming = replicas.options(stream=True)
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._board = board
        self._by_content: OrderedDict[str, DeploymentHandle] = OrderedDict()

    @property
    def is_healthy(self) -> bool:
        # Serve replaces a failed replica by itself; one replica's death is not the gateway's.
        return True

    def fail_in_flight(self) -> None:
        return None  # a replica fails its own (server/engine/ray_replica.py, check_health)

    def _for(self, adapter: AdapterHandle | None, *, stream: bool) -> DeploymentHandle:
        base = self._streaming if stream else self._replicas
        if adapter is None:
            return base
        key = f"{adapter.content_hash}:{stream}"
        handle = self._by_content.get(key)
        if handle is None:
            handle = self._by_content[key] = base.options(multiplexed_model_id=adapter.content_hash)
            while len(self._by_content) > MAX_CACHED_HANDLES:
                self._by_content.popitem(last=False)
        else:
            self._by_content.move_to_end(key)
        return handle

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        adapter: AdapterHandle | None,
    ) -> AsyncIterator[GenerationStep]:
        steps = self._for(adapter, stream=True).generate.remote(request_id, prompt_token_ids, options)
        finished = False
        try:
            async for step in steps:
                finished = step.finished
                yield step
        except AdapterLoadFailed:
            raise EngineRejected("the engine could not load this adapter's files") from None
        except EngineDead as exc:
            raise EngineDead(str(exc)) from None
        except EngineRejected as exc:
            raise EngineRejected(str(exc)) from None
        except REPLICA_LOST as exc:
            logger.warning("engine replica lost during request %s (%s)", request_id, type(exc).__name__)
            raise EngineDead("the engine replica serving this request stopped") from None
        finally:
            if not finished:
                steps.cancel()  # the client left, or the request failed: abort it on its replica

    async def add_adapter(self, adapter: AdapterHandle) -> None:
        """Load it on one replica (which then serves it first), so that a refusal comes back now."""
        try:
            await self._for(adapter, stream=False).load.remote()
        except AdapterLoadFailed:
            raise AdapterLoadFailed("its weights do not fit the base model") from None
        except REPLICA_LOST as exc:
            raise EngineDead(f"no engine replica could load the adapter ({type(exc).__name__})") from None

    async def remove_adapter(self, adapter_id: int) -> None:
        # Replicas drop adapters by their own LRU; a removed version is never requested again.
        return None

    async def cluster(self) -> list[dict[str, Any]]:
        """What each replica last reported: id, pid, node, resident adapters, in flight, healthy."""
        if self._board is None:
            return []
        return await self._board.snapshot.remote()

    async def shutdown(self) -> None:
        return None

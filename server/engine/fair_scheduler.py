"""Room in a full batch for a light tenant's request: vLLM's scheduler, with one preemption more.

vLLM's priority policy orders the engine's waiting queue, but it preempts a running request only
when the KV cache runs short. With the batch full of a flood's sequences, a light tenant's request
(one that asks for less than its share) then waits for one of them to end: the flood's requests,
let in together, end together, up to a whole request's length later.

The gateway's fair queue (server/openai/fairness.py) marks such a request urgent: its priority is
below URGENT_BELOW. While one waits and the batch is full, this scheduler preempts the running
request of the highest priority (the latest of the tenant furthest ahead), unless that one is
urgent too, before it schedules the step. vLLM puts the preempted request back in its waiting
queue and recomputes its tokens when it runs again (from its prefix cache when the blocks are
still there), as it does for a preemption of its own; its output is the same. Only urgent requests
preempt, so first come, first served (every priority 0) and backlogged tenants schedule as in vLLM.
"""

from __future__ import annotations

import time

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from server.engine.protocol import URGENT_PRIORITY

URGENT_BELOW = -(URGENT_PRIORITY >> 1)  # the fair queue takes URGENT_PRIORITY from a light tenant's priority


class _MakesRoom:
    """Preempts for urgent waiting requests; mixed into vLLM's Scheduler or its AsyncScheduler."""

    def schedule(self, *args, **kwargs):
        self._make_room_for_urgent()
        return super().schedule(*args, **kwargs)

    def _make_room_for_urgent(self) -> None:
        if self.policy != SchedulingPolicy.PRIORITY or not self.waiting or len(self.running) < self.max_num_active_reqs:
            return  # nothing waits, or a slot is free and the step takes the waiting request without help
        urgent = sorted(
            (r for r in self.waiting if r.priority < URGENT_BELOW and r.status == RequestStatus.WAITING),
            key=lambda r: (r.priority, r.arrival_time),
        )
        for request in urgent:
            if len(self.running) < self.max_num_active_reqs:
                return  # a slot is free: the step takes the waiting request without help
            victim = self._victim_for(request)
            if victim is None:
                return
            self.running.remove(victim)
            self._preempt_request(victim, time.monotonic(), drop_stale_output=self.requires_kv_delivery)

    def _victim_for(self, request: Request) -> Request | None:
        """The running request of the highest priority whose slot `request` could take: not urgent,
        with blocks that free now, and leaving an adapter slot for `request`'s adapter."""
        max_loras = self.lora_config.max_loras if self.lora_config else 0
        wanted = request.lora_request.lora_int_id if request.lora_request else 0
        for victim in sorted(self.running, key=lambda r: (r.priority, r.arrival_time), reverse=True):
            if victim.priority < URGENT_BELOW:
                return None  # every other one is urgent too, or goes before it
            if not self._request_blocks_can_be_freed(victim):
                continue
            if wanted > 0 and max_loras:
                loras = {r.lora_request.lora_int_id for r in self.running if r is not victim and r.lora_request}
                if wanted not in loras and len(loras) >= max_loras:
                    continue  # the step would skip `request` anyway: no adapter slot
            return victim
        return None


class FairScheduler(_MakesRoom, Scheduler):
    pass


class FairAsyncScheduler(_MakesRoom, AsyncScheduler):
    pass


def scheduler_for(async_scheduling: bool | None) -> type[Scheduler]:
    return FairAsyncScheduler if async_scheduling else FairScheduler

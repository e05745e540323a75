"""Fair sharing of the engine between tenants: the virtual token counter (VTC).

Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024). Each tenant has a counter
of the service it has received: input tokens × `input_weight` plus output tokens ×
`output_weight`, divided by the tenant's weight. The gateway lets at most `depth` sequences into
the engine at once (about the engine's --max-num-seqs, so that vLLM's own first-come queue stays
short); past that, requests wait here, one queue per tenant, and each free slot goes to the
waiting tenant with the lowest counter (on a tie, the one with fewer sequences in the engine).
A request whose tenant has nothing waiting lifts the tenant's counter to the lowest counter of the
other tenants waiting or running, so that idle time, or time spent asking for less, banks no
credit. A tenant that asks for less than its share is never above the others, and is served as
soon as a slot frees.

Counters advance as tokens come out of the engine (`Turn.served`), as the paper's do: a request's
cost is not known until it ends.

The queue may let a few more sequences in than the engine batches (`depth` above --max-num-seqs),
so that a slot that frees is filled at once from the engine's own queue. Each turn then carries a
`priority` for the engine's priority policy (lower goes first): the tenant's counter plus the
output its requests already in the engine may still produce (their max_tokens, less what they
produced), which is the virtual time at which this request's service starts. The engine's queue
then serves in the same fair order, and a light tenant's request passes a flood's queued ones.

A light tenant's request goes in at once, past the depth, when the engine's batch is full: one
whose tenant has nothing else waiting and, with it, holds no more than its share of the batch
(the batch × its weight / the weights of the tenants waiting or running). Its priority is then
urgent (less URGENT_PRIORITY), and the engine's scheduler preempts the latest request of the
tenant furthest ahead to make room for it (server/engine/fair_scheduler.py). Without that it
would wait for a running sequence to end: a flood's requests, let in together, end together.

Background work (batch lines, server/http/priority.py) waits in a class of its own: it goes in only
while no interactive request waits, and with the engine's lowest priorities. Its tokens count
against its tenant's counter like any other. docs/fairness.md explains the design.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.protocol import URGENT_PRIORITY

ADMIN_KEY = "(admin)"  # the admin's and shared traffic; no tenant name can have parentheses
INPUT_WEIGHT = 1.0  # the paper's w_p and w_q: an output token costs the engine about twice an input token
OUTPUT_WEIGHT = 2.0
FAIR = "fair"
FIRST_COME = "fcfs"
POLICIES = (FAIR, FIRST_COME)
# Added to a background turn's priority: the engine schedules it after every interactive request.
BACKGROUND_PRIORITY = 1 << 40


@dataclass(eq=False)
class _Waiter:
    key: str
    weight: float
    sequences: int
    prompt_tokens: int
    order: int
    enqueued_at: float
    output_tokens: int  # the most it may produce (max_tokens × its sequences)
    background: bool
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Turn:
    """A request let into the engine: its slots, and the service it is charged for."""

    def __init__(self, queue: FairQueue, key: str, weight: float, sequences: int, priority: int, reserved: float):
        self._queue = queue
        self.key = key
        self.weight = weight
        self.sequences = sequences  # slots still held
        self.priority = priority  # for the engine's priority policy: lower goes first
        self._reserved = reserved  # weighted output it may still produce, counted in its tenant's reservation

    def served(self, output_tokens: int) -> None:
        """Charge the tenant for tokens the engine produced for this request."""
        if output_tokens > 0:
            service = output_tokens * self._queue.output_weight
            self._queue._charge(self.key, self.weight, service)
            self._unreserve(min(self._reserved, service / self.weight))

    def _unreserve(self, amount: float) -> None:
        if amount > 0:
            self._reserved -= amount
            self._queue._unreserve(self.key, amount)

    def finished(self, sequences: int) -> None:
        """Give back the slots of sequences that ended (one prompt of several, say)."""
        sequences = min(sequences, self.sequences)
        if sequences > 0:
            self.sequences -= sequences
            self._queue._give_back(self.key, sequences)

    def release(self) -> None:
        """Give back every slot still held; safe to call more than once."""
        self._unreserve(self._reserved)
        self.finished(self.sequences)


class FairQueue:
    """One per engine (per ingress with --ray): who goes into the engine next."""

    def __init__(
        self,
        depth: int,
        *,
        batch: int | None = None,
        policy: str = FAIR,
        input_weight: float = INPUT_WEIGHT,
        output_weight: float = OUTPUT_WEIGHT,
        clock: Callable[[], float] = time.monotonic,
    ):
        if depth < 1:
            raise ValueError("the fair queue needs a depth of at least one sequence")
        self.depth = depth
        self.batch = batch  # the engine's batch (every replica's), which urgent turns may preempt in; None: never
        self.policy = policy
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.clock = clock
        self.in_flight = 0  # sequences in the engine
        self.counters: dict[str, float] = {}
        self.weights: dict[str, float] = {}  # each tenant's weight, as its latest request gave it
        self.running: dict[str, int] = {}  # sequences in the engine, by tenant
        # Weighted output that each tenant's requests in the engine may still produce.
        self.reserved: dict[str, float] = {}
        self._waiting: dict[str, deque[_Waiter]] = {}  # interactive requests, by tenant
        self._background: dict[str, deque[_Waiter]] = {}  # background work, by tenant
        self._last_left = 0.0  # the counter of the last tenant with nothing left waiting or running
        self._order = itertools.count()
        self._failure: BaseException | None = None
        # Hooks for metrics: (key, weighted tokens) and (key, seconds waited).
        self.on_served: Callable[[str, float], None] | None = None
        self.on_waited: Callable[[str, float], None] | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return sum(len(queue) for queues in (self._waiting, self._background) for queue in queues.values())

    def waiting_for(self, key: str) -> int:
        return len(self._waiting.get(key, ())) + len(self._background.get(key, ()))

    def _queues(self, background: bool) -> dict[str, deque[_Waiter]]:
        return self._background if background else self._waiting

    def _has_waiting(self, key: str) -> bool:
        return key in self._waiting or key in self._background

    def set_policy(self, policy: str) -> None:
        """`fair`, or `fcfs`: straight into the engine in arrival order, as vLLM alone does."""
        if policy not in POLICIES:
            raise ValueError(f"the scheduling policy must be {' or '.join(POLICIES)}, not {policy!r}")
        self.policy = policy
        if policy == FIRST_COME:  # those waiting go in now, in their order
            queues = (*self._waiting.values(), *self._background.values())
            waiters = sorted((w for queue in queues for w in queue), key=lambda w: w.order)
            self._waiting.clear()
            self._background.clear()
            for waiter in waiters:
                if not waiter.ready.done():
                    self._start(waiter, None)
        else:
            self._dispatch()

    async def turn(
        self,
        key: str,
        weight: float,
        sequences: int,
        prompt_tokens: int,
        *,
        output_tokens: int = 0,
        background: bool = False,
    ) -> Turn:
        """Wait until this request may go into the engine; cancelling the wait gives its place up.

        `output_tokens` is the most it may produce (for its priority in the engine); `background`
        work waits until no interactive request does.
        """
        if self._failure is not None:
            raise self._failure
        waiter = _Waiter(
            key, weight, sequences, prompt_tokens, next(self._order), self.clock(), output_tokens, background
        )
        self.weights[key] = weight
        urgent = not self._has_waiting(key) and self._urgent(waiter)
        if self.policy == FIRST_COME or (not self.waiting and self.in_flight < self.depth) or urgent:
            if not self._has_waiting(key):
                self._lift(key)
            return self._start(waiter, None, urgent)
        queues = self._queues(background)
        queue = queues.get(key)
        if queue is None:
            if not self._has_waiting(key):
                self._lift(key)
            queue = queues[key] = deque()
        queue.append(waiter)
        self._dispatch()
        try:
            return await waiter.ready
        except asyncio.CancelledError:
            if waiter.ready.done() and not waiter.ready.cancelled() and waiter.ready.exception() is None:
                waiter.ready.result().release()  # let in just as its client left
            else:
                self._drop(waiter)
            raise

    def fail_waiting(self, error: BaseException) -> None:
        """The engine is gone: every waiting request, and every later one, fails with `error`."""
        self._failure = error
        for queue in (*self._waiting.values(), *self._background.values()):
            for waiter in queue:
                if not waiter.ready.done():
                    waiter.ready.set_exception(error)
        self._waiting.clear()
        self._background.clear()

    # -- inside ----------------------------------------------------------------------------------

    def _urgent(self, waiter: _Waiter) -> bool:
        """Whether `waiter`, whose tenant has nothing else waiting, goes in now and preempts: the
        engine's batch is full, and its tenant holds no more than its share of it with this request."""
        if self.policy != FAIR or waiter.background or self.batch is None or self.in_flight < self.batch:
            return False
        key = waiter.key
        active = {*self._waiting, *self._background, *self.running, key}
        share = self.batch * self.weights[key] / sum(self.weights[k] for k in active)
        return self.running.get(key, 0) + waiter.sequences <= share + 1e-9

    def _lift(self, key: str) -> None:
        """A tenant with nothing waiting starts at the lowest counter of the other tenants waiting or
        running (with none, that of the last to leave), never below its own: time spent asking for
        less than its share, or nothing, earns no credit to spend later."""
        active = (self.counters[k] for k in {*self._waiting, *self._background, *self.running} if k != key)
        floor = min(active, default=self._last_left)
        self.counters[key] = max(self.counters.get(key, 0.0), floor)

    def _dispatch(self) -> None:
        while self.in_flight < self.depth:
            queues = self._waiting or self._background  # background work only while nobody else waits
            if not queues:
                return
            # Equal counters (a tenant just lifted to another's): the one with less in the engine first.
            key = min(queues, key=lambda k: (self.counters[k], self.running.get(k, 0), queues[k][0].order))
            queue = queues[key]
            waiter = queue.popleft()
            if waiter.ready.done():  # its client left; its task has not run to drop it yet
                if not queue:
                    del queues[key]
                    self._left(key)
                continue
            self._start(waiter, queue)

    def _start(self, waiter: _Waiter, queue: deque[_Waiter] | None, urgent: bool | None = None) -> Turn:
        """Let `waiter` in; `urgent` as turn() found it, or None to judge it here."""
        key, weight = waiter.key, waiter.weight
        if queue is not None and not queue:
            self._queues(waiter.background).pop(key, None)
        if urgent is None:
            urgent = not self._has_waiting(key) and self._urgent(waiter)
        self.in_flight += waiter.sequences
        self.running[key] = self.running.get(key, 0) + waiter.sequences
        # Its service starts after what the tenant's requests in the engine may still produce.
        start = self.counters.get(key, 0.0) + self.reserved.get(key, 0.0)
        priority = 0 if self.policy == FIRST_COME else round(start)
        if waiter.background:
            priority += BACKGROUND_PRIORITY
        if urgent:
            priority -= URGENT_PRIORITY
        reserved = waiter.output_tokens * self.output_weight / weight
        self.reserved[key] = self.reserved.get(key, 0.0) + reserved
        turn = Turn(self, key, weight, waiter.sequences, priority, reserved)
        self._charge(key, weight, waiter.prompt_tokens * self.input_weight)
        if self.on_waited is not None:
            self.on_waited(waiter.key, self.clock() - waiter.enqueued_at)
        if not waiter.ready.done():
            waiter.ready.set_result(turn)
        return turn

    def _drop(self, waiter: _Waiter) -> None:
        queues = self._queues(waiter.background)
        queue = queues.get(waiter.key)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del queues[waiter.key]
            self._left(waiter.key)

    def _charge(self, key: str, weight: float, service: float) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + service / weight
        if self.on_served is not None and service:
            self.on_served(key, service)

    def _unreserve(self, key: str, amount: float) -> None:
        left = self.reserved.get(key, 0.0) - amount
        if left > 1e-9:
            self.reserved[key] = left
        else:
            self.reserved.pop(key, None)

    def _give_back(self, key: str, sequences: int) -> None:
        self.in_flight -= sequences
        left = self.running.get(key, 0) - sequences
        if left > 0:
            self.running[key] = left
        else:
            self.running.pop(key, None)
            self._left(key)
        self._dispatch()

    def _left(self, key: str) -> None:
        if not self._has_waiting(key) and key not in self.running:
            self._last_left = self.counters[key]

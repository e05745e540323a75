"""The fair queue (server/openai/fairness.py): the virtual token counter, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from server.engine.protocol import URGENT_PRIORITY, EngineDead
from server.openai.fairness import ADMIN_KEY, BACKGROUND_PRIORITY, FIRST_COME, FairQueue, Turn


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Engine:
    """Runs turns the way an engine would: one token per running sequence per step."""

    def __init__(self, queue: FairQueue, tokens_per_request: int):
        self.queue = queue
        self.tokens_per_request = tokens_per_request
        self.running: list[list] = []  # [turn, tokens left]
        self.served: dict[str, int] = {}
        self.started: list[str] = []

    def admit(self, turn: Turn) -> None:
        self.running.append([turn, self.tokens_per_request])
        self.started.append(turn.key)

    def step(self) -> None:
        for item in list(self.running):
            turn, left = item
            turn.served(1)
            self.served[turn.key] = self.served.get(turn.key, 0) + 1
            item[1] = left - 1
            if item[1] == 0:
                self.running.remove(item)
                turn.release()


def closed_loop(queue: FairQueue, engine: Engine, key: str, in_flight: int, weight: float = 1.0) -> list[asyncio.Task]:
    """`in_flight` clients of tenant `key`, each sending its next request when the last one ends."""

    async def client() -> None:
        while True:
            turn = await queue.turn(key, weight, 1, 4, output_tokens=engine.tokens_per_request)
            engine.admit(turn)
            while turn.sequences:
                await asyncio.sleep(0)

    return [asyncio.create_task(client()) for _ in range(in_flight)]


async def run_steps(engine: Engine, steps: int) -> None:
    for _ in range(steps):
        await settle()
        engine.step()
    await settle()


async def stop(tasks: list[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_light_tenant_goes_before_a_flood_queued_ahead_of_it():
    queue = FairQueue(4, clock=FakeClock())
    engine = Engine(queue, tokens_per_request=8)
    flood = closed_loop(queue, engine, "a", 32)
    await run_steps(engine, 20)
    assert queue.waiting_for("a") > 20
    light = asyncio.create_task(queue.turn("b", 1.0, 1, 4))
    await settle()
    assert not light.done()  # every slot is taken
    await run_steps(engine, 8)  # the running requests end: the first free slot is b's
    assert light.done()
    assert queue.waiting_for("a") > 20
    light.result().release()
    await stop(flood)


@pytest.mark.parametrize(("weight_a", "weight_b"), [(1.0, 1.0), (2.0, 1.0)])
async def test_backlogged_tenants_share_tokens_by_weight(weight_a, weight_b):
    queue = FairQueue(8, clock=FakeClock())
    engine = Engine(queue, tokens_per_request=6)
    tasks = closed_loop(queue, engine, "a", 64, weight_a) + closed_loop(queue, engine, "b", 64, weight_b)
    await run_steps(engine, 300)
    share = engine.served["a"] / (engine.served["a"] + engine.served["b"])
    assert share == pytest.approx(weight_a / (weight_a + weight_b), abs=0.03)
    await stop(tasks)


async def test_first_come_lets_every_request_straight_into_the_engine():
    queue = FairQueue(4, policy=FIRST_COME, clock=FakeClock())
    turns = [await asyncio.wait_for(queue.turn(key, 1.0, 1, 1), 1) for key in ["a"] * 32 + ["b"]]
    assert queue.in_flight == 33  # past the depth: the engine's own first-come queue holds the rest
    assert queue.waiting == 0
    for turn in turns:
        turn.release()
    assert queue.in_flight == 0


async def test_a_tenant_that_was_idle_banks_no_credit():
    queue = FairQueue(2, clock=FakeClock())
    engine = Engine(queue, tokens_per_request=4)
    flood = closed_loop(queue, engine, "a", 8)
    await run_steps(engine, 100)  # a alone for a long while
    assert queue.counters["a"] > 500
    late = closed_loop(queue, engine, "b", 8)
    await settle()
    assert queue.counters["b"] >= queue.counters["a"] - 20  # lifted to a's, not left at 0
    engine.served.clear()
    await run_steps(engine, 40)
    assert engine.served["a"] == pytest.approx(engine.served["b"], rel=0.25)  # shares, not b alone
    await stop(flood + late)


async def test_a_client_that_leaves_while_waiting_gives_its_place_up():
    queue = FairQueue(1, clock=FakeClock())
    first = await queue.turn("a", 1.0, 1, 1)
    waiting = asyncio.create_task(queue.turn("b", 1.0, 1, 1))
    await settle()
    assert queue.waiting == 1
    waiting.cancel()
    await settle()
    assert queue.waiting == 0
    first.release()
    assert queue.in_flight == 0
    after = await asyncio.wait_for(queue.turn("c", 1.0, 1, 1), 1)
    assert queue.in_flight == 1
    after.release()
    after.release()  # twice is harmless
    assert queue.in_flight == 0


async def test_a_client_that_leaves_as_its_turn_comes_gives_the_slot_back():
    queue = FairQueue(1, clock=FakeClock())
    first = await queue.turn("a", 1.0, 1, 1)
    waiting = asyncio.create_task(queue.turn("b", 1.0, 1, 1))
    await settle()
    first.release()  # b's turn is handed over; b's task has not run yet
    waiting.cancel()
    await settle()
    assert queue.in_flight == 0


async def test_engine_death_fails_every_waiting_request():
    queue = FairQueue(1, clock=FakeClock())
    await queue.turn("a", 1.0, 1, 1)
    waiting = [asyncio.create_task(queue.turn(key, 1.0, 1, 1)) for key in ("a", "b", ADMIN_KEY)]
    await settle()
    queue.fail_waiting(EngineDead())
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(result, EngineDead) for result in results)
    with pytest.raises(EngineDead):
        await queue.turn("c", 1.0, 1, 1)


async def test_waits_and_service_reach_the_hooks():
    clock = FakeClock()
    queue = FairQueue(1, clock=clock, input_weight=1.0, output_weight=2.0)
    waits: list[tuple[str, float]] = []
    served: dict[str, float] = {}
    queue.on_waited = lambda key, seconds: waits.append((key, seconds))
    queue.on_served = lambda key, tokens: served.__setitem__(key, served.get(key, 0) + tokens)
    first = await queue.turn("a", 2.0, 1, 10)
    waiting = asyncio.create_task(queue.turn("b", 1.0, 1, 5))
    await settle()
    clock.now += 3.5
    first.served(4)
    first.release()
    second = await waiting
    assert waits == [("a", 0.0), ("b", 3.5)]
    assert served == {"a": 10 + 8, "b": 5}
    assert queue.counters["a"] == pytest.approx(9.0)  # divided by its weight, 2
    second.release()


async def test_switching_to_first_come_lets_every_waiting_request_in():
    queue = FairQueue(1, clock=FakeClock())
    first = await queue.turn("a", 1.0, 1, 1)
    waiting = [asyncio.create_task(queue.turn("b", 1.0, 1, 1)) for _ in range(3)]
    await settle()
    queue.set_policy(FIRST_COME)
    turns = await asyncio.gather(*waiting)
    assert queue.in_flight == 4
    for turn in [first, *turns]:
        turn.release()
    assert queue.in_flight == 0
    with pytest.raises(ValueError, match="fair or fcfs"):
        queue.set_policy("priority")


def test_the_default_depth_is_past_the_engines_batch_and_with_ray_every_replicas():
    from server.config import Settings

    assert Settings(max_num_seqs=16).engine_sequences == 16
    assert Settings(ray=True, replicas=3, max_num_seqs=8).engine_sequences == 24
    # Autoscaling: room for the most replicas, so that Serve still sees the load it scales on.
    assert Settings(ray=True, min_replicas=1, max_replicas=5, max_num_seqs=8).engine_sequences == 40
    # The queue lets half as many again into the engine, whose own queue holds them in fair order.
    assert Settings(max_num_seqs=16).fair_depth == 24
    assert Settings(ray=True, replicas=3, max_num_seqs=8).fair_depth == 36
    assert Settings(max_num_seqs=16, fair_queue_depth=16).fair_depth == 16
    with pytest.raises(ValueError, match="--scheduling must be fair or fcfs"):
        Settings(scheduling="priority")


async def test_a_tenant_arriving_while_another_has_the_engine_alone_starts_at_its_counter():
    queue = FairQueue(4, clock=FakeClock())
    engine = Engine(queue, tokens_per_request=4)
    alone = closed_loop(queue, engine, "b", 2)  # within the depth: b never waits
    await run_steps(engine, 50)
    assert queue.waiting == 0 and queue.counters["b"] > 100
    arriving = await queue.turn("a", 1.0, 1, 4)
    assert queue.counters["a"] >= queue.counters["b"] - 20  # not 0: b's time alone is no debt of b's
    arriving.release()
    await stop(alone)


async def test_a_slot_freed_between_a_clients_leaving_and_its_task_noticing_is_not_lost():
    queue = FairQueue(1, clock=FakeClock())
    first = await queue.turn("a", 1.0, 1, 1)
    waiting = asyncio.create_task(queue.turn("b", 1.0, 1, 1))
    await settle()
    waiting.cancel()  # cancels the future it awaits now; its own code runs on the next loop turn
    first.release()  # a slot frees before then: it must not go to the request that left
    await asyncio.gather(waiting, return_exceptions=True)
    assert (queue.in_flight, queue.waiting, queue.running) == (0, 0, {})
    again = await asyncio.wait_for(queue.turn("c", 1.0, 1, 1), 1)
    again.release()


async def test_background_work_goes_in_only_while_no_interactive_request_waits():
    queue = FairQueue(1, clock=FakeClock())
    first = await queue.turn("a", 1.0, 1, 1)
    line = asyncio.create_task(queue.turn("b", 1.0, 1, 1, background=True))  # b has the lower counter
    await settle()
    interactive = [asyncio.create_task(queue.turn("a", 1.0, 1, 1)) for _ in range(2)]
    await settle()
    assert queue.waiting == 3 and queue.waiting_for("b") == 1
    first.release()
    await settle()
    assert interactive[0].done() and not line.done()  # arrived later, from the tenant served more
    interactive[0].result().release()
    await settle()
    assert interactive[1].done() and not line.done()
    interactive[1].result().release()
    await settle()
    assert line.done()  # nothing interactive waits now
    line.result().release()
    assert (queue.in_flight, queue.waiting, queue.running) == (0, 0, {})


async def test_background_tokens_count_against_their_tenants_share():
    queue = FairQueue(1, clock=FakeClock())
    line = await queue.turn("a", 1.0, 1, 10, background=True)
    waiting = [asyncio.create_task(queue.turn(key, 1.0, 1, 1)) for key in ("a", "b")]
    await settle()
    line.served(100)  # a's batch line: 10 + 2 × 100
    assert queue.counters["a"] == pytest.approx(210)
    line.release()
    await settle()
    assert waiting[1].done() and not waiting[0].done()  # b goes first: a's line was a's service
    waiting[1].result().release()
    await settle()
    waiting[0].result().release()


async def test_the_engine_priority_keeps_the_fair_order_past_the_engines_batch():
    """Turns let in past the engine's batch wait in its queue, which serves the lowest priority first: a
    light tenant's request passes the flood's queued ones, and background work comes after both."""
    queue = FairQueue(7, clock=FakeClock())
    flood = [await queue.turn("a", 1.0, 1, 4, output_tokens=32) for _ in range(5)]
    priorities = [turn.priority for turn in flood]
    assert priorities == sorted(priorities) and len(set(priorities)) == 5  # each after a's earlier ones
    light = await queue.turn("b", 1.0, 1, 4, output_tokens=32)  # lifted to a's counter, with nothing reserved
    assert light.priority < min(turn.priority for turn in flood[1:])
    line = await asyncio.wait_for(queue.turn("b", 1.0, 1, 4, output_tokens=32, background=True), 1)
    assert line.priority >= BACKGROUND_PRIORITY
    for turn in [*flood, light, line]:
        turn.release()
    assert queue.reserved == {}  # what turns may still produce goes with them
    queue.set_policy(FIRST_COME)
    plain = await queue.turn("a", 1.0, 1, 4, output_tokens=32)
    assert plain.priority == 0  # first come: the engine's arrival order
    plain.release()


@pytest.mark.parametrize(("weight_b", "shares"), [(1.0, 2), (1 / 3, 1)])
async def test_a_light_tenant_goes_in_at_once_past_a_full_batch_and_may_preempt(weight_b, shares):
    """With the engine's batch full, a request of a tenant that asks for no more than its share of the
    batch goes in at once, past the depth, with an urgent priority (the engine preempts for it).
    Past its share, or with requests of its own waiting, it waits its turn; so do background work,
    and every request while the batch has room."""
    queue = FairQueue(6, batch=4, clock=FakeClock())
    early = await queue.turn("b", weight_b, 1, 4, output_tokens=32)
    assert early.priority >= 0  # the batch had room
    early.release()
    flood = [asyncio.create_task(queue.turn("a", 1.0, 1, 4, output_tokens=32)) for _ in range(10)]
    await settle()
    assert queue.in_flight == 6 and queue.waiting_for("a") == 4
    light = []
    for _ in range(shares):  # the batch of 4 × b's weight / both weights
        light.append(await asyncio.wait_for(queue.turn("b", weight_b, 1, 4, output_tokens=32), 1))
        assert -URGENT_PRIORITY <= light[-1].priority < 0
    assert queue.in_flight == 6 + shares  # past the depth
    over = asyncio.create_task(queue.turn("b", weight_b, 1, 4, output_tokens=32))
    line = asyncio.create_task(queue.turn("c", 1.0, 1, 4, output_tokens=32, background=True))
    await settle()
    assert not over.done() and not line.done()
    queued_too = asyncio.create_task(queue.turn("b", weight_b, 1, 4, output_tokens=32))
    await settle()
    assert not queued_too.done()  # b has a request waiting already
    for turn in light:
        turn.release()
    await settle()
    for task in (*flood, over, queued_too):
        if task.done():
            assert task.result().priority >= 0
    for task in (*flood, over, queued_too, line):
        task.cancel()
    await asyncio.gather(*flood, over, queued_too, line, return_exceptions=True)


@pytest.mark.parametrize(("weight_a", "weight_b"), [(1.0, 1.0), (2.0, 1.0)])
async def test_a_queue_deeper_than_the_engine_shares_by_weight_in_the_engines_order(weight_a, weight_b):
    """The engine runs 4 sequences; the queue lets 6 in, and the engine picks its next by priority."""
    queue = FairQueue(6, clock=FakeClock())
    engine = PriorityEngine(queue, tokens_per_request=6, batch=4)
    tasks = closed_loop(queue, engine, "a", 64, weight_a) + closed_loop(queue, engine, "b", 64, weight_b)
    await run_steps(engine, 400)
    share = engine.served["a"] / (engine.served["a"] + engine.served["b"])
    assert share == pytest.approx(weight_a / (weight_a + weight_b), abs=0.04)
    await stop(tasks)


class PriorityEngine(Engine):
    """Runs at most `batch` turns; the others wait in its own queue, lowest priority first (vLLM's policy)."""

    def __init__(self, queue: FairQueue, tokens_per_request: int, batch: int):
        super().__init__(queue, tokens_per_request)
        self.batch = batch
        self.queued: list[Turn] = []

    def admit(self, turn: Turn) -> None:
        self.queued.append(turn)

    def step(self) -> None:
        self.queued.sort(key=lambda turn: turn.priority)
        while self.queued and len(self.running) < self.batch:
            super().admit(self.queued.pop(0))
        super().step()

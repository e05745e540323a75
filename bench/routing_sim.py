"""A routing simulation: many adapters over many replicas, each with a small adapter cache.

Two cores cannot show what 64 replicas do, so this simulates them. Requests for `--adapters`
adapters with Zipf popularity arrive as a Poisson stream; a routing policy picks a replica for
each. A replica keeps at most `--max-models-per-replica` adapters (least recently used out first,
as Ray's multiplexer and vLLM's `--max-cpu-loras` cache do), loads one adapter at a time
(`--load-seconds` each), and runs at most `--slots` requests at once for `--service-seconds`
each; the others wait in its engine queue, first come first served. It measures cold loads per
request and how evenly the requests spread over the replicas.

Policies:
- `ray-multiplex`: Ray Serve 2.60's default router (`PowerOfTwoChoicesRequestRouter` with
  `MultiplexMixin`, ray/serve/_private/request_router/). It prefers the replicas that report the
  request's model id; if none does, or those are full, the replicas with the fewest models;
  after a matching timeout drawn from [T, 2T] (`--match-timeout`, Ray's
  `RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S`), those once more and then any replica.
  Within a candidate set it takes two at random and sends to the shorter queue, if that queue
  is below `max_ongoing_requests` (`--max-ongoing`); the model count never refuses a request.
  When no replica takes it, the request retries at once, then after 25 ms, 50 ms, ... up to
  500 ms (Ray's backoff). The router sees each replica's model ids `--report-delay` seconds late:
  replicas push them to the controller, which broadcasts them to the routers.
- `random`: a replica chosen uniformly at random, like a plain Kubernetes Service.
- `consistent-hash`: a hash ring with `--virtual-nodes` points a replica; an adapter always goes
  to the replica that owns its point.
- `consistent-hash-bounded`: consistent hashing with bounded loads (Mirrokni, Thorup and
  Zadimoghaddam, 2018): walk the ring from the adapter's point to the first replica whose
  requests in flight are below ceil(`--hash-balance` x (all in flight + 1) / replicas).

Only `ray-multiplex` holds requests at the router (its `max_ongoing_requests`); the other three
queue them at the replica. Left out: several routers (Ray runs one per proxy and handle, each
with its own view), Ray's FIFO hand-over of replicas between pending requests of one model,
locality, base-model requests, and service times that grow with the batch.

`python -m bench.routing_sim_cli --help` lists every flag (the command line, its table, JSON and plot
are in bench/routing_sim_cli.py); bench/README.md and docs/benchmarks.md describe the runs.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import random
import statistics
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

POLICIES = ("ray-multiplex", "random", "consistent-hash", "consistent-hash-bounded")

# Ray Serve 2.60's router retry (ray/serve/_private/constants.py: RAY_SERVE_ROUTER_RETRY_*).
RAY_BACKOFF_INITIAL_S = 0.025
RAY_BACKOFF_MULTIPLIER = 2
RAY_BACKOFF_MAX_S = 0.5

_LOAD_START, _LOADED, _READY, _FINISH, _REPORT, _RETRY = range(6)


@dataclass(frozen=True)
class SimConfig:
    """One simulated run: one policy over one number of replicas. Fields mirror the flags."""

    policy: str = "ray-multiplex"
    replicas: int = 8
    adapters: int = 1000
    zipf_alpha: float = 1.0
    max_models_per_replica: int = 8
    slots: int = 16
    max_ongoing: int = 32
    service_seconds: float = 1.0
    load_seconds: float = 0.1
    offered_load: float = 0.7
    requests: int = 100_000
    warmup: int = 20_000
    report_delay: float = 1.0
    match_timeout: float = 1.0
    virtual_nodes: int = 100
    hash_balance: float = 1.25
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first field out of range."""
        if self.policy not in POLICIES:
            raise ValueError(f"--policies: unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        whole = {
            "replicas": 1,
            "adapters": 1,
            "max_models_per_replica": 1,
            "slots": 1,
            "max_ongoing": 1,
            "requests": 1,
            "warmup": 0,
            "virtual_nodes": 1,
        }
        for name, least in whole.items():
            if getattr(self, name) < least:
                raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(self, name)}")
        positive = ("service_seconds", "offered_load")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be above 0, got {getattr(self, name)}")
        for name in ("zipf_alpha", "load_seconds", "report_delay", "match_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.policy == "ray-multiplex" and self.max_ongoing < self.slots:
            raise ValueError(
                f"--max-ongoing {self.max_ongoing} is below --slots {self.slots}: Ray would then admit fewer requests "
                "than a replica runs at once, and --offered-load counts slots; give --slots the same value"
            )
        if self.hash_balance <= 1:
            raise ValueError(
                f"--hash-balance must be above 1 (1.25 allows 25 % over the mean), got {self.hash_balance}"
            )

    @property
    def arrival_rate(self) -> float:
        """Requests a second: `offered_load` of what the replicas' slots can serve."""
        return self.offered_load * self.replicas * self.slots / self.service_seconds


@dataclass
class SimResult:
    """A run's configuration, its summary (what --json writes) and its raw routing counts."""

    config: SimConfig
    summary: dict[str, Any]
    routed: list[int]
    adapter_replicas: dict[int, set[int]] = field(repr=False)


def adapter_name(rank: int) -> str:
    return f"adapter-{rank}"


def request_stream(config: SimConfig) -> tuple[list[float], list[int]]:
    """Unit-rate exponential gaps and adapter ranks (0 is the most popular), from the seed alone.

    The stream does not depend on the policy or the number of replicas: every run with one seed
    asks for the same adapters in the same order, only faster with more replicas.
    """
    rng = random.Random(f"stream:{config.seed}")
    weights = [rank**-config.zipf_alpha for rank in range(1, config.adapters + 1)]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    last = config.adapters - 1
    count = config.requests + config.warmup
    ranks = [min(bisect.bisect(cumulative, rng.random() * total), last) for _ in range(count)]
    gaps = [rng.expovariate(1.0) for _ in range(count)]
    return gaps, ranks


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring: each replica at `virtual_nodes` points of a 64-bit circle."""

    def __init__(self, replicas: int, virtual_nodes: int) -> None:
        points = sorted((_hash64(f"replica-{r}#{v}"), r) for r in range(replicas) for v in range(virtual_nodes))
        self._points = [point for point, _ in points]
        self._owners = [owner for _, owner in points]
        self._replicas = replicas
        self._preference: dict[str, tuple[int, ...]] = {}

    def owner(self, key: str) -> int:
        """The replica at the first point clockwise from the key's hash."""
        return self._owners[bisect.bisect(self._points, _hash64(key)) % len(self._points)]

    def preference(self, key: str) -> tuple[int, ...]:
        """Every replica once, in the order met walking clockwise from the key's hash."""
        if (order := self._preference.get(key)) is None:
            start = bisect.bisect(self._points, _hash64(key))
            seen: dict[int, None] = {}
            for step in range(len(self._points)):
                seen.setdefault(self._owners[(start + step) % len(self._points)])
                if len(seen) == self._replicas:
                    break
            order = self._preference[key] = tuple(seen)
        return order


class _Replica:
    __slots__ = ("index", "resident", "loading", "load_free_at", "running", "waiting", "ongoing")

    def __init__(self, index: int) -> None:
        self.index = index
        self.resident: OrderedDict[int, None] = OrderedDict()  # adapter LRU, oldest first
        self.loading: dict[int, float] = {}  # adapter -> time its load ends
        self.load_free_at = 0.0  # loads run one at a time, as under Ray's model-cache lock
        self.running = 0
        self.waiting: deque[_Request] = deque()
        self.ongoing = 0  # routed here and not finished: Ray's queue length

    def model_ids(self) -> frozenset[int]:
        """What Ray's multiplexer reports: the models loaded and those being loaded."""
        return frozenset(self.resident).union(self.loading)


class _Request:
    __slots__ = (
        "adapter",
        "arrival",
        "measured",
        "route_start",
        "tried_first",
        "tried_fewest",
        "backed_off",
        "attempt",
    )

    def __init__(self, adapter: int, arrival: float, measured: bool) -> None:
        self.adapter = adapter
        self.arrival = arrival
        self.measured = measured
        self.route_start: float | None = None
        self.tried_first = False
        self.tried_fewest = False
        self.backed_off = False
        self.attempt = 0


class Simulation:
    """A discrete-event run of one SimConfig; `run()` returns its SimResult."""

    def __init__(self, config: SimConfig) -> None:
        config.validate()
        self.config = config
        self.rng = random.Random(f"route:{config.seed}:{config.policy}:{config.replicas}")
        self.replicas = [_Replica(i) for i in range(config.replicas)]
        self.all_replica_ids = tuple(range(config.replicas))
        self.total_ongoing = 0
        self._events: list[tuple[float, int, int, Any]] = []
        self._sequence = itertools.count()
        # What the Ray router believes, `report_delay` behind the replicas.
        self.ray_view: list[frozenset[int]] = [frozenset()] * config.replicas
        self.ray_model_replicas: dict[int, set[int]] = {}
        self.ray_fallback_match: set[int] = set()
        self._ray_fewest: tuple[int, ...] | None = None
        self.ring = HashRing(config.replicas, config.virtual_nodes) if config.policy.startswith("consistent") else None
        self._route: Callable[[_Request, float], None] = {
            "ray-multiplex": self._route_ray,
            "random": self._route_random,
            "consistent-hash": self._route_hash,
            "consistent-hash-bounded": self._route_hash_bounded,
        }[config.policy]
        # Measures, over the requests after the warm-up.
        self.routed = [0] * config.replicas
        self.adapter_replicas: dict[int, set[int]] = {}
        self.cold = 0
        self.loads = 0
        self.waits: list[float] = []

    def run(self) -> SimResult:
        config = self.config
        gaps, ranks = request_stream(config)
        scale = 1.0 / config.arrival_rate
        now = 0.0
        first_measured = 0.0
        for index, (gap, adapter) in enumerate(zip(gaps, ranks, strict=True)):
            now += gap * scale
            if index == config.warmup:
                first_measured = now
            self._advance(now)
            self._route(_Request(adapter, now, index >= config.warmup), now)
        last_arrival = now
        self._advance(math.inf)
        return SimResult(config, self._summary(last_arrival - first_measured), self.routed, self.adapter_replicas)

    # -- events ---------------------------------------------------------------------------------

    def _push(self, when: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._events, (when, next(self._sequence), kind, payload))

    def _advance(self, until: float) -> None:
        events = self._events
        while events and events[0][0] <= until:
            when, _, kind, payload = heapq.heappop(events)
            if kind == _FINISH:
                self._finish(payload, when)
            elif kind == _READY:
                self._enter_engine(payload[0], payload[1], when)
            elif kind == _LOAD_START:
                self._load_start(payload, when)
            elif kind == _LOADED:
                self._loaded(payload[0], payload[1])
            elif kind == _REPORT:
                self._ray_report(payload[0], payload[1])
            else:
                self._route_ray(payload, when)

    def _dispatch(self, request: _Request, replica: _Replica, now: float) -> None:
        """The request reaches the replica, which makes its adapter resident, then runs it."""
        if request.measured:
            self.routed[replica.index] += 1
            self.adapter_replicas.setdefault(request.adapter, set()).add(replica.index)
        replica.ongoing += 1
        self.total_ongoing += 1
        adapter = request.adapter
        if adapter in replica.resident:
            replica.resident.move_to_end(adapter)
            self._enter_engine(replica, request, now)
            return
        if request.measured:
            self.cold += 1
        ready = replica.loading.get(adapter)
        if ready is None:  # not even loading: this request loads it
            if request.measured:
                self.loads += 1
            start = max(now, replica.load_free_at)
            ready = replica.load_free_at = start + self.config.load_seconds
            replica.loading[adapter] = ready
            self._push(start, _LOAD_START, replica)
            self._push(ready, _LOADED, (replica, adapter))
            self._report_later(replica, now)
        self._push(ready, _READY, (replica, request))

    def _load_start(self, replica: _Replica, now: float) -> None:
        """As Ray's multiplexer does under its lock: a full replica evicts its LRU adapter first."""
        if len(replica.resident) >= self.config.max_models_per_replica:
            replica.resident.popitem(last=False)
            self._report_later(replica, now)

    def _loaded(self, replica: _Replica, adapter: int) -> None:
        del replica.loading[adapter]
        replica.resident[adapter] = None

    def _enter_engine(self, replica: _Replica, request: _Request, now: float) -> None:
        if replica.running < self.config.slots:
            replica.running += 1
            if request.measured:
                self.waits.append(now - request.arrival)
            self._push(now + self.config.service_seconds, _FINISH, replica)
        else:
            replica.waiting.append(request)

    def _finish(self, replica: _Replica, now: float) -> None:
        replica.running -= 1
        replica.ongoing -= 1
        self.total_ongoing -= 1
        if replica.waiting:
            self._enter_engine(replica, replica.waiting.popleft(), now)

    # -- policies -------------------------------------------------------------------------------

    def _route_random(self, request: _Request, now: float) -> None:
        self._dispatch(request, self.replicas[self.rng.randrange(self.config.replicas)], now)

    def _route_hash(self, request: _Request, now: float) -> None:
        assert self.ring is not None
        self._dispatch(request, self.replicas[self.ring.owner(adapter_name(request.adapter))], now)

    def _route_hash_bounded(self, request: _Request, now: float) -> None:
        assert self.ring is not None
        cap = math.ceil(self.config.hash_balance * (self.total_ongoing + 1) / self.config.replicas)
        for index in self.ring.preference(adapter_name(request.adapter)):
            if self.replicas[index].ongoing < cap:
                self._dispatch(request, self.replicas[index], now)
                return
        raise AssertionError("bounded loads always leave a replica under the cap")

    def _route_ray(self, request: _Request, now: float) -> None:
        """One pass of Ray's routing loop; on failure, retry as its backoff does."""
        while True:
            candidates = self._ray_candidates(request, now)
            replica = self._power_of_two(tuple(candidates)) if candidates else None
            if replica is not None:
                self._dispatch(request, replica, now)
                return
            if not request.backed_off:  # Ray retries once at once, then backs off
                request.backed_off = True
                continue
            growth = RAY_BACKOFF_MULTIPLIER ** min(request.attempt, 32)  # Ray caps it too, on overflow
            delay = min(RAY_BACKOFF_INITIAL_S * growth, RAY_BACKOFF_MAX_S)
            request.attempt += 1
            self._push(now + delay, _RETRY, request)
            return

    def _ray_candidates(self, request: _Request, now: float) -> Iterable[int]:
        """MultiplexMixin.apply_multiplex_routing, over the router's delayed view."""
        if request.route_start is None:
            request.route_start = now
        timeout = self.rng.uniform(self.config.match_timeout, 2 * self.config.match_timeout)
        model = request.adapter
        if now - request.route_start < timeout:
            candidates: Iterable[int] = self.ray_model_replicas.get(model, ())
            if (not candidates and model not in self.ray_fallback_match) or request.tried_first:
                candidates = self._ray_fewest_models()
                self.ray_fallback_match.add(model)
            elif candidates:
                self.ray_fallback_match.discard(model)
            request.tried_first = True
            return candidates
        if not request.tried_fewest:
            request.tried_fewest = True
            return self._ray_fewest_models()
        return self.all_replica_ids

    def _ray_fewest_models(self) -> tuple[int, ...]:
        if self._ray_fewest is None:
            least = min(len(models) for models in self.ray_view)
            self._ray_fewest = tuple(i for i, models in enumerate(self.ray_view) if len(models) == least)
        return self._ray_fewest

    def _power_of_two(self, candidates: Sequence[int]) -> _Replica | None:
        """PowerOfTwoChoicesRequestRouter: two at random, the shorter queue if it has room."""
        count = len(candidates)
        if count == 1:
            chosen: Sequence[int] = candidates
        elif count == 2:
            chosen = candidates if self.rng.getrandbits(1) else (candidates[1], candidates[0])
        else:
            first = self.rng.randrange(count)
            second = self.rng.randrange(count - 1)
            if second >= first:
                second += 1
            chosen = (candidates[first], candidates[second])
        best, lowest = None, math.inf
        for index in chosen:
            replica = self.replicas[index]
            if replica.ongoing < self.config.max_ongoing and replica.ongoing < lowest:
                best, lowest = replica, replica.ongoing
        return best

    def _report_later(self, replica: _Replica, now: float) -> None:
        if self.config.policy == "ray-multiplex":
            self._push(now + self.config.report_delay, _REPORT, (replica.index, replica.model_ids()))

    def _ray_report(self, index: int, models: frozenset[int]) -> None:
        old = self.ray_view[index]
        for model in old - models:
            holders = self.ray_model_replicas[model]
            holders.discard(index)
            if not holders:
                del self.ray_model_replicas[model]
        for model in models - old:
            self.ray_model_replicas.setdefault(model, set()).add(index)
        if len(old) != len(models):
            self._ray_fewest = None
        self.ray_view[index] = models

    # -- measures -------------------------------------------------------------------------------

    def _summary(self, measured_seconds: float) -> dict[str, Any]:
        config = self.config
        mean = statistics.fmean(self.routed)
        waits = sorted(self.waits)
        p50, p99 = _percentile(waits, 0.50), _percentile(waits, 0.99)
        return {
            "policy": config.policy,
            "replicas": config.replicas,
            "report_delay_s": config.report_delay if config.policy == "ray-multiplex" else None,
            "requests": config.requests,
            "cold_per_request": self.cold / config.requests,
            "loads_per_request": self.loads / config.requests,
            "routed_max_over_mean": max(self.routed) / mean,
            "routed_cv": statistics.pstdev(self.routed) / mean,
            "wait_p50_s": p50,
            "wait_p99_s": p99,
            "latency_p99_s": p99 + config.service_seconds,
            "top_adapter_replicas": len(self.adapter_replicas.get(0, ())),
            "measured_seconds": measured_seconds,
        }


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks, as numpy's default."""
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def simulate(config: SimConfig) -> SimResult:
    """Run one configuration."""
    return Simulation(config).run()


def sweep(
    base: SimConfig,
    policies: Sequence[str],
    replica_counts: Sequence[int],
    report_delays: Sequence[float],
    progress: Callable[[SimConfig], None] | None = None,
) -> list[SimResult]:
    """Every policy at every replica count; ray-multiplex once per report delay."""
    configs = []
    for replicas in replica_counts:
        for policy in policies:
            delays = report_delays if policy == "ray-multiplex" else report_delays[:1]
            configs += [replace(base, policy=policy, replicas=replicas, report_delay=delay) for delay in delays]
    for config in configs:
        config.validate()
    results = []
    for config in configs:
        if progress is not None:
            progress(config)
        results.append(simulate(config))
    return results

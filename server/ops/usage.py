"""Recent usage per model, in a rolling window of short buckets, for the console's charts.

The telemetry middleware feeds it the generation requests it already measures for /metrics.
Usage is kept per caller (a tenant, or the admin) and model, so a tenant can be shown its own
requests and no one else's; the admin sees the sums. Everything older than the window is
dropped, and each bucket keeps a bounded sample of latencies, so memory stays bounded.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from adapters.errors import AdapterNotFound

if TYPE_CHECKING:
    from adapters.registry import Registry
    from server.http.observe import RequestRecord

BUCKET_SECONDS = 10
WINDOW_SECONDS = 15 * 60
LATENCY_SAMPLES = 200  # per bucket and series: a reservoir, so p99 stays an estimate under load
MAX_SERIES = 2048  # (caller, model) pairs held at once; the oldest go first past this


@dataclass
class Bucket:
    """What one caller's requests to one model did in one BUCKET_SECONDS span."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    seen: int = 0  # successful requests offered to the reservoir

    def add_latency(self, seconds: float, rng: random.Random) -> None:
        self.seen += 1
        if len(self.latencies) < LATENCY_SAMPLES:
            self.latencies.append(seconds)
        elif (slot := rng.randrange(self.seen)) < LATENCY_SAMPLES:
            self.latencies[slot] = seconds


@dataclass(frozen=True)
class ModelKey:
    """A served model as the registry names it: owner ('' when shared) and plain name."""

    owner: str
    name: str
    base: bool = False

    @property
    def qualified_name(self) -> str:
        return self.name if not self.owner else f"{self.owner}/{self.name}"


class UsageWindow:
    """Requests, tokens and latencies per caller and model over the last WINDOW_SECONDS."""

    def __init__(
        self,
        window_seconds: int = WINDOW_SECONDS,
        bucket_seconds: int = BUCKET_SECONDS,
        clock: Callable[[], float] = time.time,
    ):
        self.window_seconds = window_seconds
        self.bucket_seconds = bucket_seconds
        self._clock = clock
        self._rng = random.Random(0)
        # (caller tenant or None for the admin, model) -> bucket index -> bucket
        self._series: dict[tuple[str | None, ModelKey], dict[int, Bucket]] = {}

    def record(
        self,
        caller: str | None,
        model: ModelKey,
        *,
        ok: bool,
        seconds: float,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """One answered generation request by `caller` (None: the admin) to `model`."""
        index = int(self._clock() // self.bucket_seconds)
        key = (caller, model)
        buckets = self._series.pop(key, None)  # re-inserted last: dict order is recency
        if buckets is None:
            buckets = {}
            if len(self._series) >= MAX_SERIES:
                del self._series[next(iter(self._series))]
        self._series[key] = buckets
        bucket = buckets.get(index)
        if bucket is None:
            bucket = buckets[index] = Bucket()
            self._prune(buckets, index)
        bucket.requests += 1
        bucket.prompt_tokens += prompt_tokens
        bucket.completion_tokens += completion_tokens
        if ok:
            bucket.add_latency(seconds, self._rng)
        else:
            bucket.errors += 1

    def observe(self, registry: Registry, record: RequestRecord, status: int, seconds: float) -> None:
        """Record an answered generation request, under the model its caller's name resolves to.

        Unauthenticated requests and names that resolve to nothing are not recorded: neither
        belongs to a caller or a model, and made-up names must not fill the window.
        """
        if record.model is None or status in (401, 403, 404):
            return
        try:
            entry = registry.resolve(record.model, tenant=record.tenant, admin=record.tenant is None)
        except AdapterNotFound:
            return  # deleted while the request ran
        model = ModelKey(entry.owner, entry.name, base=entry is registry.base)
        self.record(
            record.tenant,
            model,
            ok=status < 400,
            seconds=seconds,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
        )

    def forget(self, tenant: str) -> int:
        """Drop every series of `tenant`: its own requests, and the admin's to its adapters; how many."""
        gone = [key for key in self._series if key[0] == tenant or key[1].owner == tenant]
        for key in gone:
            del self._series[key]
        return len(gone)

    def _prune(self, buckets: dict[int, Bucket], newest: int) -> None:
        oldest = newest - self._bucket_count() + 1
        for index in [i for i in buckets if i < oldest]:
            del buckets[index]

    def _bucket_count(self) -> int:
        return max(1, math.ceil(self.window_seconds / self.bucket_seconds))

    def report(
        self, visible: Callable[[str | None, ModelKey], bool], *, qualified: bool, minutes: float | None = None
    ) -> dict:
        """Per model, the sums over the window and one point per bucket, for the series `visible` allows.

        `qualified`: name tenants' adapters 'tenant/name' (the admin's view) or by plain name.
        """
        span = self.window_seconds if minutes is None else min(self.window_seconds, max(1.0, minutes * 60))
        count = max(1, math.ceil(span / self.bucket_seconds))
        now = self._clock()
        newest = int(now // self.bucket_seconds)
        indices = range(newest - count + 1, newest + 1)
        merged: dict[ModelKey, dict[int, Bucket]] = {}
        for (caller, model), buckets in self._series.items():
            if not visible(caller, model):
                continue
            into = merged.setdefault(model, {})
            for index in indices:
                if (bucket := buckets.get(index)) is not None:
                    _merge(into.setdefault(index, Bucket()), bucket)
        seconds = count * self.bucket_seconds
        data = [
            _model_report(model, buckets, indices, self.bucket_seconds, seconds, qualified)
            for model, buckets in sorted(merged.items(), key=lambda item: (not item[0].base, item[0].qualified_name))
        ]
        return {
            "object": "usage",
            "now": now,
            "window_seconds": seconds,
            "bucket_seconds": self.bucket_seconds,
            "data": [entry for entry in data if entry["requests"]],
        }


def _merge(into: Bucket, other: Bucket) -> None:
    into.requests += other.requests
    into.errors += other.errors
    into.prompt_tokens += other.prompt_tokens
    into.completion_tokens += other.completion_tokens
    into.latencies.extend(other.latencies)


def percentile(values: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _model_report(
    model: ModelKey, buckets: dict[int, Bucket], indices: range, bucket_seconds: int, seconds: int, qualified: bool
) -> dict:
    total = Bucket()
    points = []
    for index in indices:
        bucket = buckets.get(index, Bucket())
        _merge(total, bucket)
        points.append(
            {
                "start": index * bucket_seconds,
                "requests": bucket.requests,
                "errors": bucket.errors,
                "tokens": bucket.prompt_tokens + bucket.completion_tokens,
                "p50_latency_ms": _ms(percentile(bucket.latencies, 0.5)),
                "p99_latency_ms": _ms(percentile(bucket.latencies, 0.99)),
            }
        )
    return {
        "model": model.qualified_name if qualified else model.name,
        "base": model.base,
        "requests": total.requests,
        "errors": total.errors,
        "requests_per_second": round(total.requests / seconds, 4),
        "prompt_tokens": total.prompt_tokens,
        "completion_tokens": total.completion_tokens,
        "p50_latency_ms": _ms(percentile(total.latencies, 0.5)),
        "p99_latency_ms": _ms(percentile(total.latencies, 0.99)),
        "series": points,
    }

"""Tenants, their limits, and admission: concurrency and a token bucket per tenant."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

from adapters.database import Database, KeyRow
from adapters.errors import OwnerNotFound
from adapters.retention import PurgedTenant, purge_tenant
from server.http.errors import GatewayError, InvalidRequest, TooManySequences

TENANT_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


class RateLimited(GatewayError):
    """A tenant is over one of its limits."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class TenantNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "tenant_not_found"

    def __init__(self, name: str):
        super().__init__(f"no tenant named '{name[:64]}'", param="name")


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits; the gateway's settings give the defaults."""

    max_concurrent: int = 16
    requests_per_second: float = 20.0
    max_adapters: int = 100
    max_upload_bytes: int = 512 * 1024 * 1024
    max_file_bytes: int = 1024 * 1024 * 1024  # training files kept, all together
    max_queued_jobs: int = 4  # fine-tuning jobs validating or queued
    max_pinned: int = 1  # adapters pinned in the engine's cache; tenants together get half of it at most
    max_merges: int = 4  # merged_adapters compositions kept; past it, the tenant's least recently used goes
    max_queued_batches: int = 8  # batches not finished
    max_batch_lines: int = 100_000  # lines of those batches, together
    max_stored_responses: int = 10_000  # Responses API responses kept (store: true) until they expire
    # Fair sharing (docs/fairness.md): the tenant's share of the engine, and of a training run's time.
    weight: float = 1.0  # a tenant of weight 2 gets twice the tokens of one of weight 1 when both wait
    max_training_seconds: float = 24 * 3600.0  # wall-clock limit of one fine-tuning job

    def updated(self, changes: dict) -> TenantLimits:
        unknown = set(changes) - set(asdict(self))
        if unknown:
            raise InvalidRequest(f"unknown limit '{sorted(unknown)[0]}'", param="limits")
        for key, value in changes.items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise InvalidRequest(f"limit '{key}' must be a positive number", param=f"limits.{key}")
        return replace(self, **{k: type(getattr(self, k))(v) for k, v in changes.items()})


@dataclass
class _Usage:
    in_flight: int = 0
    tokens: float = 0.0
    refilled_at: float = field(default_factory=time.monotonic)


class Tenants:
    """The tenants in the catalog, their limits, and their current usage."""

    def __init__(self, catalog: Database, defaults: TenantLimits):
        self._catalog = catalog
        self.defaults = defaults
        self._limits: dict[str, TenantLimits] = {}
        self._created: dict[str, float] = {}
        for name, (overrides, created) in catalog.tenants().items():
            self._limits[name] = defaults.updated(overrides)
            self._created[name] = created
        self._usage: dict[str, _Usage] = {}

    def names(self) -> list[str]:
        return sorted(self._limits)

    def exists(self, name: str) -> bool:
        return name in self._limits

    def limits(self, name: str) -> TenantLimits:
        limits = self._limits.get(name)
        if limits is None:
            raise TenantNotFound(name)
        return limits

    def created_at(self, name: str) -> float:
        return self._created.get(name, 0.0)

    async def create(self, name: str, overrides: dict, first_key: KeyRow | None = None) -> bool:
        """Add a tenant, with its first key in the same transaction; False when the name is taken."""
        if not (1 <= len(name) <= 64 and set(name) <= TENANT_NAME_CHARS and name[0].isalnum()):
            raise InvalidRequest(
                "tenant names are 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit",
                param="name",
            )
        limits = self.defaults.updated(overrides)
        created = time.time()
        if not await asyncio.to_thread(self._catalog.add_tenant, name, overrides, first_key, created):
            return False
        self._limits[name] = limits
        self._created[name] = created
        return True

    async def _require(self, name: str) -> TenantLimits:
        """The tenant's limits; one another gateway made a moment ago is read from the catalog."""
        if name not in self._limits:
            stored = await asyncio.to_thread(self._catalog.tenants)
            if name in stored:
                self._take(name, *stored[name])
        return self.limits(name)

    async def update(self, name: str, overrides: dict) -> TenantLimits:
        current = await self._require(name)
        limits = current.updated(overrides)
        stored = {k: v for k, v in asdict(limits).items() if v != getattr(self.defaults, k)}
        await asyncio.to_thread(self._catalog.set_tenant_limits, name, stored)
        self._limits[name] = limits
        return limits

    async def delete(self, name: str) -> PurgedTenant:
        """The tenant and every row it owns leave the catalog in one transaction (adapters/retention.py)."""
        await self._require(name)
        try:
            purged = await asyncio.to_thread(purge_tenant, self._catalog, name)
        except OwnerNotFound:
            self._forget(name)  # another gateway deleted it a moment ago
            raise TenantNotFound(name) from None
        self._forget(name)
        return purged

    def _forget(self, name: str) -> None:
        self._limits.pop(name, None)
        self._created.pop(name, None)
        self._usage.pop(name, None)

    def apply(self, tenants: dict[str, tuple[dict, float]]) -> set[str]:
        """Take the catalog's tenants and limits, all of them, whichever process wrote them; usage stays.

        Returns the tenants deleted since the last look, and those deleted and made again (a new
        `created_at`), whose earlier selves' state this process must drop.
        """
        return self.apply_changes({name: None for name in self._limits if name not in tenants} | tenants)

    def apply_changes(self, changes: dict[str, tuple[dict, float] | None]) -> set[str]:
        """Take the catalog's rows for these tenants (None: deleted); returns the gone ones, as `apply`."""
        gone = {
            name
            for name, stored in changes.items()
            if name in self._limits and (stored is None or stored[1] != self._created.get(name))
        }
        for name in gone:
            self._forget(name)
        for name, stored in changes.items():
            if stored is not None:
                self._take(name, *stored)
        return gone

    def _take(self, name: str, overrides: dict, created: float) -> None:
        self._limits[name] = self.defaults.updated(overrides)
        self._created[name] = created

    def in_flight(self, name: str) -> int:
        usage = self._usage.get(name)
        return usage.in_flight if usage else 0

    def admit(self, name: str, units: int = 1) -> Callable[[], None]:
        """Count a request against the tenant's rate and `units` against its concurrency (a
        generation takes one per sequence); returns what gives them back."""
        limits = self.limits(name)
        if units > limits.max_concurrent:
            raise TooManySequences(
                f"this request asks for {units} sequences; this key's tenant may run at most "
                f"{limits.max_concurrent} at once: lower n, or send fewer prompts",
                param="n",
            )
        usage = self._usage.setdefault(name, _Usage(tokens=max(1.0, limits.requests_per_second)))
        now = time.monotonic()
        burst = max(1.0, limits.requests_per_second)
        usage.tokens = min(burst, usage.tokens + (now - usage.refilled_at) * limits.requests_per_second)
        usage.refilled_at = now
        if usage.in_flight + units > limits.max_concurrent:
            raise RateLimited(
                f"at most {limits.max_concurrent} requests at once for this key's tenant, each sequence "
                f"(prompts × n) counting as one: {usage.in_flight} running, this one needs {units}",
                1,
            )
        if usage.tokens < 1.0:
            wait = (1.0 - usage.tokens) / limits.requests_per_second
            raise RateLimited(f"at most {limits.requests_per_second:g} requests per second for this key's tenant", wait)
        usage.tokens -= 1.0
        usage.in_flight += units

        def release() -> None:  # called once, by the generator's admission
            usage.in_flight -= units

        return release

    @contextmanager
    def admitted(self, name: str | None) -> Iterator[None]:
        """One request of tenant `name` (none: the admin's, not limited), counted while the block runs."""
        release = self.admit(name) if name is not None else None
        try:
            yield
        finally:
            if release is not None:
                release()

"""Hooks the registry calls when an adapter's residency changes; the server's metrics implement them."""

from __future__ import annotations

from typing import Protocol


class RegistryEvents(Protocol):
    """Adapter residency changes, for metrics."""

    def adapter_loaded(self, name: str, seconds: float) -> None: ...

    def adapter_reloaded(self, name: str) -> None: ...

    def adapter_evicted(self, name: str) -> None: ...


class NoEvents:
    """RegistryEvents that go nowhere."""

    def adapter_loaded(self, name: str, seconds: float) -> None:
        pass

    def adapter_reloaded(self, name: str) -> None:
        pass

    def adapter_evicted(self, name: str) -> None:
        pass

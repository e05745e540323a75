"""The part of an engine that the registry drives: adding and removing adapters.

`server/engine/protocol.py` extends this into the whole engine interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class AdapterHandle:
    """An adapter the engine has accepted: its unique id, engine-side name and files."""

    adapter_id: int
    name: str
    path: str
    content_hash: str = ""  # the files' identity: engines on other hosts fetch them by it


class AdapterLoadFailed(Exception):
    """The engine refused an adapter; it keeps serving."""


class AdapterEngine(Protocol):
    """Adds and removes adapters by handle and id."""

    async def add_adapter(self, adapter: AdapterHandle) -> None: ...

    async def remove_adapter(self, adapter_id: int) -> None: ...

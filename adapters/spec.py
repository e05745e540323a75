"""What the catalog knows of one adapter's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SHARED = ""  # the owner of adapters every tenant sees


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter: where its files are and what they hold."""

    path: Path
    rank: int
    target_modules: tuple[str, ...]
    size_bytes: int
    content_hash: str

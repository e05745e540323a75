"""The periodic store sweep: every --store-sweep-seconds, remove stored objects nothing references.

The rule is adapters/retention.py's (and docs/operations.md's). Every gateway sweeps its own
cache and the shared store; deleting one object twice is harmless. A catalog or store that cannot
be reached is tried again at the next pass.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from adapters.errors import Unavailable
from adapters.retention import StoreSweep

logger = logging.getLogger(__name__)


async def run_sweeps(sweep: StoreSweep, held: Callable[[], set[str]], interval_seconds: float) -> None:
    """Sweep every `interval_seconds`, until cancelled; `held()` names what this process still uses."""
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            await asyncio.to_thread(sweep.sweep, held())
        except Unavailable:
            logger.warning("store sweep: the catalog or the store is unreachable; trying again next time")
        except Exception:  # noqa: BLE001 - the loop must outlive any one failure
            logger.exception("store sweep failed")

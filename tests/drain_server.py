"""The FakeEngine gateway with slow streams, served by server.commands.serving: what test_serving.py signals.

python -m tests.drain_server PORT STATE_DIR DRAIN_SECONDS
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from adapters.database import Database
from adapters.registry import Registry
from server.app import build_app
from server.commands.serving import serve_app
from server.config import Settings
from server.engine.protocol import AdapterHandle, GenerationStep, SamplingOptions
from server.ops.logs import configure_logging
from tests.fakes import FakeEngine, fake_spec

STEP_SECONDS = 0.2
logger = logging.getLogger("drain_server")


class SlowEngine(FakeEngine):
    """A FakeEngine that takes STEP_SECONDS per streamed token and logs its shutdown."""

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions, adapter: AdapterHandle
    ) -> AsyncIterator[GenerationStep]:
        async for step in super().generate(request_id, prompt_token_ids, options, adapter):
            await asyncio.sleep(STEP_SECONDS)
            yield step

    async def shutdown(self) -> None:
        await super().shutdown()
        logger.info("engine shut down")


def main(port: int, state_dir: Path, drain_seconds: float) -> int:
    settings = Settings(
        served_model_name="base",
        port=port,
        state_dir=state_dir,
        drain_seconds=drain_seconds,
        max_cpu_loras=3,
        max_loras=2,
        log_format="json",
    )
    configure_logging(settings.log_level, settings.log_format)
    engine = SlowEngine(max_model_len=256)
    registry = Registry(
        engine,
        base_name="base",
        base_adapter=fake_spec("__base__", 1),
        max_resident=2,
        catalog=Database(state_dir / "catalog.sqlite3"),
    )
    serve_app(build_app(settings, engine, registry), settings)
    logger.info("serve_app returned")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])))

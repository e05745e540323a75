"""The catalog's schema versions, applied by Alembic at start (`upgrade`).

A revision never changes once released; a new schema is a new file under `versions/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa


def upgrade(connection: sa.Connection) -> None:
    """Bring the catalog on `connection` to the newest schema, inside its transaction."""
    from alembic import command
    from alembic.config import Config

    # Alembic narrates each step at INFO; the gateway logs what the catalog holds instead.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def current_revision(connection: sa.Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()

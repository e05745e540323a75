"""The catalog's change log: which adapters, tenants and keys each write touched.

Gateways read the entries past the version they have applied and reload only those rows
(server/ops/catalog_sync.py). The log keeps the newest versions only; `log_floor` is the version
from which on it is complete, and a gateway that has applied less than that reloads everything.
A catalog that had no log starts its floor at its current version.

Revision ID: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_log",
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("base_fingerprint", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.Text, nullable=False, server_default=""),
        sa.Column("name", sa.Text, nullable=False, server_default=""),
    )
    op.create_index("catalog_log_version", "catalog_log", ["version"])
    op.add_column("catalog_changes", sa.Column("log_floor", sa.BigInteger, nullable=False, server_default="0"))
    op.execute("UPDATE catalog_changes SET log_floor = version")


def downgrade() -> None:
    raise NotImplementedError("the catalog is not downgraded; restore a backup instead")

"""Adapters record their base model; a change counter for other processes to poll.

Adapter names become unique per base model and owner. Rows from before get an empty
fingerprint, which the first base that opens the catalog claims.

Revision ID: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_COLUMNS = "owner, name, content_hash, rank, target_modules, size_bytes, pinned, created_at"


def upgrade() -> None:
    # A new table and a copy, not ALTER: SQLite cannot change a primary key in place.
    op.create_table(
        "adapters_new",
        sa.Column("base_fingerprint", sa.Text, nullable=False, server_default=""),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("base_model", sa.Text, nullable=False, server_default=""),
        sa.Column("content_hash", sa.Text, nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("target_modules", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("pinned", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("base_fingerprint", "owner", "name", name="adapters_base_pkey"),
    )
    op.execute(f"INSERT INTO adapters_new ({_COLUMNS}) SELECT {_COLUMNS} FROM adapters")
    op.drop_table("adapters")
    op.rename_table("adapters_new", "adapters")
    op.create_table(
        "catalog_changes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO catalog_changes (id, version) VALUES (1, 0)")


def downgrade() -> None:
    raise NotImplementedError("the catalog is not downgraded; restore a backup instead")

"""The first catalog: adapters by owner and name, tenants, API key hashes.

Catalogs written before migrations existed already hold these tables; they are kept as they are.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if "adapters" not in existing:
        op.create_table(
            "adapters",
            sa.Column("owner", sa.Text, nullable=False),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("content_hash", sa.Text, nullable=False),
            sa.Column("rank", sa.Integer, nullable=False),
            sa.Column("target_modules", sa.Text, nullable=False),
            sa.Column("size_bytes", sa.BigInteger, nullable=False),
            sa.Column("pinned", sa.Boolean, nullable=False, server_default=sa.false()),
            sa.Column("created_at", sa.Double, nullable=False),
            sa.PrimaryKeyConstraint("owner", "name"),
        )
    if "tenants" not in existing:
        op.create_table(
            "tenants",
            sa.Column("name", sa.Text, primary_key=True),
            sa.Column("limits", sa.Text, nullable=False),
            sa.Column("created_at", sa.Double, nullable=False),
        )
    if "api_keys" not in existing:
        op.create_table(
            "api_keys",
            sa.Column("key_id", sa.Text, primary_key=True),
            sa.Column("tenant", sa.Text, sa.ForeignKey("tenants.name", ondelete="CASCADE"), nullable=False),
            sa.Column("key_hash", sa.Text, nullable=False, unique=True),
            sa.Column("created_at", sa.Double, nullable=False),
        )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_table("adapters")

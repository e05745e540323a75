"""Responses: OpenAI's stored responses (`store: true`), owned by a tenant, kept until they expire.

Revision ID: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("input_items", sa.Text, nullable=False),
        sa.Column("context", sa.Text, nullable=False),
    )
    op.create_index("responses_by_owner", "responses", ["owner", "expires_at"])
    op.create_index("responses_by_expiry", "responses", ["expires_at"])


def downgrade() -> None:
    raise NotImplementedError("the catalog is not downgraded; restore a backup instead")

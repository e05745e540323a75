"""Batches: OpenAI's Batch API, and each batch's line results until its files are written.

Revision ID: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("base_fingerprint", sa.Text, nullable=False),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("input_file_id", sa.Text, nullable=False),
        sa.Column("completion_window", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("metadata", sa.Text, nullable=True),
        sa.Column("errors", sa.Text, nullable=True),
        sa.Column("output_file_id", sa.Text, nullable=True),
        sa.Column("error_file_id", sa.Text, nullable=True),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("completed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("runner", sa.Text, nullable=True),
        sa.Column("heartbeat_at", sa.Double, nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Column("in_progress_at", sa.Double, nullable=True),
        sa.Column("finalizing_at", sa.Double, nullable=True),
        sa.Column("completed_at", sa.Double, nullable=True),
        sa.Column("failed_at", sa.Double, nullable=True),
        sa.Column("expired_at", sa.Double, nullable=True),
        sa.Column("cancelling_at", sa.Double, nullable=True),
        sa.Column("cancelled_at", sa.Double, nullable=True),
    )
    op.create_index("batches_by_owner", "batches", ["owner", "created_at"])
    op.create_index("batches_by_status", "batches", ["status"])
    op.create_table(
        "batch_lines",
        sa.Column("batch_id", sa.Text, sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("result", sa.Text, nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("the catalog is not downgraded; restore a backup instead")

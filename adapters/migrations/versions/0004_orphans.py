"""Rows of tenants deleted before deletion was complete: their files, jobs, events and checkpoints.

Until this release, deleting a tenant left its files and fine-tuning jobs in the catalog, and a new
tenant of the same name inherited them. They are deleted here; their bytes are unreferenced now,
and the store sweep removes them (docs/operations.md, "Deletion and the store sweep").

Revision ID: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# '' is the shared owner (the admin's files and jobs), which has no tenant row.
_ORPHAN = "owner <> '' AND owner NOT IN (SELECT name FROM tenants)"


def upgrade() -> None:
    orphan_jobs = f"SELECT id FROM fine_tuning_jobs WHERE {_ORPHAN}"
    op.execute(f"DELETE FROM fine_tuning_events WHERE job_id IN ({orphan_jobs})")
    op.execute(f"DELETE FROM fine_tuning_checkpoints WHERE job_id IN ({orphan_jobs})")
    op.execute(f"DELETE FROM fine_tuning_jobs WHERE {_ORPHAN}")
    op.execute(f"DELETE FROM files WHERE {_ORPHAN}")
    op.execute(f"DELETE FROM adapters WHERE {_ORPHAN}")


def downgrade() -> None:
    raise NotImplementedError("the catalog is not downgraded; restore a backup instead")

"""The creating API key of each batch (``batches.key_id``).

Batch lines are checked against that key's models and charged to its rate limits. Rows
from before this revision get NULL: under ``auth:`` their remaining lines fail (the key
is unknown), as a batch's lines do when its key is removed.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.add_column(sa.Column("key_id", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as table:
        table.drop_column("key_id")

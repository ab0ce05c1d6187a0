"""Files, batches and the per-line checkpoint table.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_files",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(1024), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("lines", sa.Integer),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("object_key", sa.String(1024), nullable=False),
    )
    op.create_index("ix_batch_files_tenant_seq", "batch_files", ["tenant", "seq"])
    op.create_index("ix_batch_files_expires_at", "batch_files", ["expires_at"])
    stamps = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
              "cancelling_at", "cancelled_at")
    counters = ("total", "completed", "failed")
    tokens = ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
              "total_tokens")
    op.create_table(
        "batches",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(64), nullable=False, unique=True),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        *(sa.Column(name, sa.BigInteger) for name in stamps),
        sa.Column("output_file_id", sa.String(64)),
        sa.Column("error_file_id", sa.String(64)),
        sa.Column("errors", sa.Text),
        sa.Column("metadata", sa.Text),
        sa.Column("model", sa.String(255)),
        sa.Column("output_expires_after", sa.Integer),
        *(sa.Column(name, sa.Integer, nullable=False, server_default="0") for name in counters),
        *(sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in tokens),
        sa.Column("lease_owner", sa.String(255)),
        sa.Column("lease_until", sa.Float),
        sa.Column("lease_epoch", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("ix_batches_tenant_seq", "batches", ["tenant", "seq"])
    op.create_index("ix_batches_status", "batches", ["status"])
    op.create_table(
        "batch_results",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ok", sa.Boolean, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("batch_results")
    op.drop_table("batches")
    op.drop_table("batch_files")

"""Tables of the Files and Batch API (SQLAlchemy Core; migrations in ``migrations/``).

Times are unix seconds (ints, as the API shows them) except ``lease_until`` (float).
The tenant of auth-off deployments is stored as ``""`` so ownership is one equality;
ownership is the tenant's, permissions and rate limits the creating key's (``key_id``).
``seq`` orders lists stably (creation order) and is the pagination key behind ``after``.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Row,
    String,
    Table,
    Text,
)

#: A row of one of the tables below, columns untyped (``Row`` is generic in its columns).
AnyRow: TypeAlias = "Row[*tuple[Any, ...]]"

metadata = MetaData()

files = Table(
    "batch_files",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant", String(255), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("filename", String(1024), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("lines", Integer, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("status", String(16), nullable=False),
    Column("object_key", String(1024), nullable=False),
    Index("ix_batch_files_tenant_seq", "tenant", "seq"),
    Index("ix_batch_files_expires_at", "expires_at"),
)

batches = Table(
    "batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant", String(255), nullable=False),
    #: The id of the API key that created the batch: its lines are checked against that
    #: key's models and charged to its limits. NULL when auth was off (and for batches
    #: created before 0002, which then run only while auth stays off).
    Column("key_id", String(255)),
    Column("endpoint", String(64), nullable=False),
    Column("input_file_id", String(64), nullable=False),
    Column("completion_window", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("in_progress_at", BigInteger),
    Column("finalizing_at", BigInteger),
    Column("completed_at", BigInteger),
    Column("failed_at", BigInteger),
    Column("expired_at", BigInteger),
    Column("cancelling_at", BigInteger),
    Column("cancelled_at", BigInteger),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("errors", Text),  # JSON list of BatchError, or NULL
    Column("metadata", Text),  # JSON object, or NULL
    Column("model", String(255)),
    Column("output_expires_after", Integer),
    Column("total", Integer, nullable=False, default=0),
    Column("completed", Integer, nullable=False, default=0),
    Column("failed", Integer, nullable=False, default=0),
    Column("input_tokens", BigInteger, nullable=False, default=0),
    Column("cached_tokens", BigInteger, nullable=False, default=0),
    Column("output_tokens", BigInteger, nullable=False, default=0),
    Column("reasoning_tokens", BigInteger, nullable=False, default=0),
    Column("total_tokens", BigInteger, nullable=False, default=0),
    Column("lease_owner", String(255)),
    Column("lease_until", Float),
    Column("lease_epoch", Integer, nullable=False, default=0),
    Index("ix_batches_tenant_seq", "tenant", "seq"),
    Index("ix_batches_status", "status"),
)

#: One row per finished line while a batch runs: the checkpoint. Deleted at finalization.
results = Table(
    "batch_results",
    metadata,
    Column("batch_id", String(64), primary_key=True),
    Column("line", Integer, primary_key=True, autoincrement=False),
    Column("ok", Boolean, nullable=False),
    Column("data", LargeBinary, nullable=False),  # the output/error JSONL line, no newline
)

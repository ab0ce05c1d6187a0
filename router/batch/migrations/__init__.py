"""Alembic migrations of the batch tables; run by ``router.batch.db.migrate``."""

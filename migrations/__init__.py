"""Alembic migrations for trackrelay's tables (``trackrelay migrate`` runs them)."""

"""The Alembic migrations produce exactly ``pipeline.schema.metadata``, on both backends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from conftest import POSTGRES_ADMIN_URL
from pipeline.config import DatabaseConfig
from pipeline.migrate import current_revision, head_revision, is_current, upgrade
from pipeline.schema import metadata
from pipeline.store import create_store_engine


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """A store engine on a database with no tables at all (not the migrated test template)."""
    if request.param == "sqlite":
        engine = create_store_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'empty.db'}"))
        yield engine
        engine.dispose()
        return
    request.getfixturevalue("postgres_template")  # skips (or fails under CI) without Postgres
    admin_url = sa.make_url(POSTGRES_ADMIN_URL)
    name = f"trackrelay_empty_{os.getpid()}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    engine = create_store_engine(DatabaseConfig(url=admin_url.set(database=name).render_as_string(False)))
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def drift(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return compare_metadata(context, metadata)


def test_upgrade_head_produces_exactly_the_models(empty_engine: sa.Engine) -> None:
    upgrade(empty_engine)

    assert drift(empty_engine) == []
    assert set(sa.inspect(empty_engine).get_table_names()) == {"alembic_version", *metadata.tables}
    assert {"outbox", "rejected"} <= set(metadata.tables)


def test_the_drift_check_sees_a_missing_index(empty_engine: sa.Engine) -> None:
    # The check above could pass vacuously if compare_metadata looked at nothing.
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_outbox_state_id")

    assert [d[0] for d in drift(empty_engine)] == ["add_index"]


def test_an_empty_database_is_not_current_and_is_after_upgrade(empty_engine: sa.Engine) -> None:
    assert current_revision(empty_engine) is None
    assert is_current(empty_engine) is False

    upgrade(empty_engine)

    assert current_revision(empty_engine) == head_revision()
    assert head_revision() is not None
    assert is_current(empty_engine) is True


def test_upgrade_is_idempotent(empty_engine: sa.Engine) -> None:
    upgrade(empty_engine)
    with empty_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO outbox (received_at_ms, route, source, body) "
                             "VALUES (1, 'track', 'default', :body)"), {"body": b"{}"})

    upgrade(empty_engine)

    assert is_current(empty_engine) is True
    assert drift(empty_engine) == []
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT body, state FROM outbox")).all() == [(b"{}", "pending")]

"""Retrying and dead deliveries do not slow other claims: the claim's query plans, on both backends.

A table of 20k deliveries of one sick destination (half waiting for a retry, half dead) and a
few due ones of healthy destinations: every claim, the sick destination's own included, is a
range scan of ix_deliveries_claim (ordered by it, so no sort) with the ordering probe on
ix_deliveries_user_order, and no plan reads the whole deliveries table. SQLite both without
statistics (the worker never runs ANALYZE) and after ANALYZE (an operator may); Postgres after
ANALYZE (autovacuum's). The timings with a million rows are in bench/claims.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import insert

from pipeline.migrate import upgrade
from pipeline.queue import DeliveryQueue
from pipeline.schema import deliveries
from pipeline.store import Store, now_ms
from stored_rows import add_event, opened_store

SICK_ROWS = 20_000
HOUR_MS = 3_600_000


@pytest.fixture(scope="module",
                params=["sqlite", "sqlite-analysed", pytest.param("postgres", marks=pytest.mark.postgres)])
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One filled database per backend for the whole module (the fill is the slow part)."""
    if request.param == "postgres":
        url = _postgres_database(request)
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('plans') / 'trackrelay.db'}"
        engine = sa.create_engine(url)
        upgrade(engine)
        engine.dispose()
    for store in opened_store(url):
        _fill(store, analyse=request.param != "sqlite")
        yield store


def _postgres_database(request: pytest.FixtureRequest) -> str:
    """A database from the session's migrated template, dropped when the module ends."""
    import conftest

    template = request.getfixturevalue("postgres_template")
    name = f"trackrelay_plans_{os.getpid()}"
    admin = conftest._admin_engine()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    request.addfinalizer(drop)
    return conftest._url_for(name)


def _fill(store: Store, analyse: bool) -> None:
    now = now_ms()
    event_id = add_event(store, "plans")

    def row(destination: str, state: str, next_at: int, user_key: str | None = None) -> dict[str, Any]:
        return {"event_id": event_id, "destination": destination, "state": state, "attempts": 3,
                "created_at_ms": now, "next_attempt_at_ms": next_at, "user_key": user_key,
                "finished_at_ms": now if state == "dead" else None, "last_error": "HTTP 500"}

    sick = [row("sick", "pending", now + HOUR_MS) if i % 2 else row("sick", "dead", now) for i in range(SICK_ROWS)]
    # An ordered destination whose users each wait for one retry, their later events held to it.
    held = [row("held", "pending", now + HOUR_MS, f"user-{i % 50}") for i in range(2_000)]
    healthy = [row("healthy", "pending", now) for _ in range(50)]
    ordered = [row("healthy-ordered", "pending", now, f"user-{i}") for i in range(50)]
    with store.engine.begin() as conn:
        conn.execute(insert(deliveries), sick + held + healthy + ordered)
        if analyse:
            conn.exec_driver_sql("ANALYZE")
    if analyse and store.backend == "sqlite":
        assert _statistics(store), "ANALYZE stored no statistics"


DESTINATIONS = ["healthy", "healthy-ordered", "sick", "held"]


@pytest.mark.parametrize("destination", DESTINATIONS)
def test_a_claim_is_an_index_range_scan_whatever_else_the_table_holds(filled: Store, destination: str) -> None:
    plan = DeliveryQueue(filled, "plans").claim_plan(destination)

    if filled.backend == "postgresql":
        nodes = list(_postgres_nodes(plan[0]["Plan"]))
        on_deliveries = [n for n in nodes if n.get("Relation Name") == "deliveries" and n["Node Type"] != "ModifyTable"]
        assert not [n for n in on_deliveries if "Index" not in n["Node Type"]], nodes  # no Seq or Bitmap Heap Scan
        assert "Sort" not in [n["Node Type"] for n in nodes]  # the index gives the claim order
        (due,) = [n for n in on_deliveries if n.get("Index Name") == "ix_deliveries_claim"]
        assert due["Node Type"] == "Index Scan"
        assert all(column in due["Index Cond"] for column in ("destination", "state", "next_attempt_at_ms"))
        (probe,) = [n for n in on_deliveries if n.get("Index Name") == "ix_deliveries_user_order"]
        assert probe["Parent Relationship"] == "SubPlan"
    else:
        details = [detail for _, _, detail in plan]
        assert details[0] == ("SEARCH d USING INDEX ix_deliveries_claim "
                              "(destination=? AND state=? AND next_attempt_at_ms<?)")
        assert "SEARCH p USING INDEX ix_deliveries_user_order (destination=? AND user_key=? AND id<?)" in details
        # (With statistics SQLite scans events, right for the one row this table holds.)
        assert not [d for d in details if d.startswith(("SCAN d", "SCAN p")) or "TEMP B-TREE" in d], details


def test_recording_retries_looks_each_retried_delivery_up_by_id(filled: Store) -> None:
    # A retry moves its user's later deliveries' next attempt (pipeline.queue): the retried
    # deliveries are found by primary key and their users' later ones in the partial index,
    # never by reading the partial index (all ordered pending deliveries) or the table.
    with filled.engine.connect() as conn:
        ids = [row[0] for row in conn.exec_driver_sql(
            "SELECT id FROM deliveries WHERE destination IN ('held', 'sick') ORDER BY id DESC LIMIT 100")]
    plan = DeliveryQueue(filled, "plans").hold_later_plan([(i, now_ms()) for i in ids])

    if filled.backend == "postgresql":
        scans = [n for n in _postgres_nodes(plan[0]["Plan"]) if n.get("Relation Name") == "deliveries"
                 and n["Node Type"] != "ModifyTable"]
        assert sorted((n["Node Type"], n["Index Name"]) for n in scans) == [
            ("Index Scan", "ix_deliveries_user_order"), ("Index Scan", "pk_deliveries")], scans
        (later,) = [n for n in scans if n["Index Name"] == "ix_deliveries_user_order"]
        assert "user_key = " in later["Index Cond"]
    else:
        assert [detail for _, _, detail in plan] == [
            "SEARCH deliveries USING INDEX ix_deliveries_user_order (destination=? AND user_key=? AND id>?)",
            "SCALAR SUBQUERY 1", "SEARCH h USING INTEGER PRIMARY KEY (rowid=?)",
            "SCALAR SUBQUERY 2", "SEARCH h USING INTEGER PRIMARY KEY (rowid=?)"]


def test_the_plans_claim_what_they_should(filled: Store) -> None:
    # The plans above are for claims that find the right rows: the healthy ones all, the sick
    # and held ones none (their rows wait for an hour or are dead).
    queue = DeliveryQueue(filled, "plans")
    taken = {destination: len(queue.claim(destination, 100, 60_000)) for destination in DESTINATIONS}
    assert taken == {"healthy": 50, "healthy-ordered": 50, "sick": 0, "held": 0}


def _statistics(store: Store) -> list[Any]:
    with store.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT * FROM sqlite_stat1 WHERE tbl = 'deliveries'").all()


def _postgres_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _postgres_nodes(child)

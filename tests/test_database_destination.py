"""The database destination: warehouse tables on a SQLite file and the real Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from pipeline import exactjson
from pipeline.destinations.base import DELIVERED, Outcome
from pipeline.destinations.database import (TABLE_OF_TYPE, DatabaseDestination, DatabaseOptions, event_row,
                                           warehouse_tables)

COMMON = {
    "userId": "u1", "anonymousId": "a1",
    "context": {"ip": "203.0.113.9", "library": {"name": "analytics-python", "version": "2.3.3"},
                "locale": "fr-FR"},
    "integrations": {},
    "timestamp": "2026-11-26T10:00:00.000Z", "originalTimestamp": "2026-11-26T09:59:58.000Z",
    "sentAt": "2026-11-26T10:00:01.500Z", "receivedAt": "2026-11-26T10:00:02.250Z",
}
EVENTS = {
    "identify": {"type": "identify", "messageId": "m-identify", "traits": {"email": "a@example.com"}},
    "track": {"type": "track", "messageId": "m-track", "event": "Signed Up", "properties": {"plan": "pro"}},
    "page": {"type": "page", "messageId": "m-page", "name": "Home", "properties": {"path": "/"}},
    "screen": {"type": "screen", "messageId": "m-screen", "name": "Main", "properties": {"v": 1}},
    "group": {"type": "group", "messageId": "m-group", "groupId": "g1", "traits": {"size": 12}},
    "alias": {"type": "alias", "messageId": "m-alias", "previousId": "old-id"},
}
TYPE_COLUMNS = {
    "identify": {"traits": '{"email":"a@example.com"}'},
    "track": {"event": "Signed Up", "properties": '{"plan":"pro"}'},
    "page": {"name": "Home", "properties": '{"path":"/"}'},
    "screen": {"name": "Main", "properties": '{"v":1}'},
    "group": {"group_id": "g1", "traits": '{"size":12}'},
    "alias": {"previous_id": "old-id"},
}


def event(kind: str, **extra: Any) -> dict[str, Any]:
    return {**COMMON, **EVENTS[kind], **extra}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def warehouse_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'warehouse.db'}"


@pytest.fixture
def warehouse(warehouse_url: str) -> Iterator[DatabaseDestination]:
    destination = DatabaseDestination("warehouse", DatabaseOptions(url=warehouse_url), 200)
    asyncio.run(destination.start())
    yield destination
    assert destination.engine is not None
    assert destination.engine.pool.checkedout() == 0
    asyncio.run(destination.close())


def deliver(destination: DatabaseDestination, events: list[dict[str, Any]]) -> list[Outcome]:
    return asyncio.run(destination.deliver(events))


def rows(url: str, table: str, prefix: str = "") -> list[dict[str, Any]]:
    """The rows of ``table``, read through its Core table so that times come back as datetimes."""
    metadata, _ = warehouse_tables(prefix)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.select(metadata.tables[prefix + table]).order_by(sa.text("id")))
            return [dict(row) for row in result.mappings()]
    finally:
        engine.dispose()


def utc(value: datetime | None) -> datetime | None:
    # SQLite keeps no offset: the destination stores UTC, so a naive value is UTC.
    if value is None or value.tzinfo is None:
        return value and value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def test_every_type_lands_in_its_table_with_its_columns(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    events = [event(kind) for kind in EVENTS]
    assert deliver(warehouse, events) == [DELIVERED] * 6
    for kind, table in TABLE_OF_TYPE.items():
        [row] = rows(warehouse_url, table)
        loaded_at = utc(row.pop("loaded_at"))
        assert loaded_at is not None and loaded_at.year >= 2026
        row = {k: utc(v) if isinstance(v, datetime) else v for k, v in row.items()}
        assert row == {
            "id": f"m-{kind}",
            "received_at": datetime(2026, 11, 26, 10, 0, 2, 250000, tzinfo=timezone.utc),
            "sent_at": datetime(2026, 11, 26, 10, 0, 1, 500000, tzinfo=timezone.utc),
            "timestamp": datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc),
            "original_timestamp": datetime(2026, 11, 26, 9, 59, 58, tzinfo=timezone.utc),
            "user_id": "u1", "anonymous_id": "a1",
            "context_ip": "203.0.113.9",
            "context_library_name": "analytics-python", "context_library_version": "2.3.3",
            "context": orjson.dumps(COMMON["context"]).decode(),
            "event_json": orjson.dumps(event(kind)).decode(),
            **TYPE_COLUMNS[kind],
        }


def test_full_event_json_round_trips(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    sent = event("track", properties={"nested": {"list": [1, 2.5, None, True], "text": "é\u2028"}})
    deliver(warehouse, [sent])
    [row] = rows(warehouse_url, "tracks")
    assert orjson.loads(row["event_json"]) == sent
    assert orjson.loads(row["properties"]) == sent["properties"]


def test_redelivering_the_same_events_adds_no_rows(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    events = [event("track", messageId=f"m{n}") for n in range(3)]
    assert deliver(warehouse, events) == [DELIVERED] * 3
    first = rows(warehouse_url, "tracks")
    assert deliver(warehouse, events + [event("track", messageId="m3")]) == [DELIVERED] * 4
    assert [row["id"] for row in rows(warehouse_url, "tracks")] == ["m0", "m1", "m2", "m3"]
    assert rows(warehouse_url, "tracks")[:3] == first


def test_the_same_message_twice_in_one_batch_is_one_row(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    assert deliver(warehouse, [event("track"), event("track")]) == [DELIVERED, DELIVERED]
    assert [row["id"] for row in rows(warehouse_url, "tracks")] == ["m-track"]


def test_numeric_ids_are_stored_as_their_text(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    deliver(warehouse, [event("group", userId=42, anonymousId=1.5, groupId=7)])
    [row] = rows(warehouse_url, "groups")
    assert (row["user_id"], row["anonymous_id"], row["group_id"]) == ("42", "1.5", "7")


def test_absent_fields_are_null(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    deliver(warehouse, [{"type": "track", "messageId": "m1", "userId": "u1", "event": "Bare"}])
    [row] = rows(warehouse_url, "tracks")
    assert {k: v for k, v in row.items() if v is None} == {
        "received_at": None, "sent_at": None, "timestamp": None, "original_timestamp": None,
        "anonymous_id": None, "context_ip": None, "context_library_name": None,
        "context_library_version": None, "context": None, "properties": None,
    }


def test_undeliverable_events_are_rejected_alone(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    outcomes = deliver(warehouse, [
        event("track", messageId="good-1"),
        event("track", messageId="bad-type", type="flush"),
        event("track", messageId="bad-time", timestamp="yesterday"),
        event("track", messageId="x" * 101),
        {"messageId": "no-type", "userId": "u1"},
        event("track", messageId="big-int", properties={"n": 2**70}),
        event("track", messageId="good-2"),
    ])
    assert [(o.kind, o.reason) for o in outcomes] == [
        ("delivered", ""),
        ("rejected", "type 'flush' has no table (expected one of identify, track, page, screen, group, alias)"),
        ("rejected", "timestamp: 'yesterday' is not an ISO-8601 time"),
        ("rejected", "messageId must be a non-empty string of at most 100 characters"),
        ("rejected", "type None has no table (expected one of identify, track, page, screen, group, alias)"),
        ("rejected", "cannot serialise event as JSON: Integer exceeds 64-bit range"),
        ("delivered", ""),
    ]
    assert [row["id"] for row in rows(warehouse_url, "tracks")] == ["good-1", "good-2"]


@pytest.mark.postgres
def test_a_row_the_database_refuses_is_rejected_alone(postgres_url: str) -> None:
    # Postgres text cannot hold NUL: the chunk fails, then each row is tried on its own.
    destination = DatabaseDestination("warehouse", DatabaseOptions(url=postgres_url), 2)
    asyncio.run(destination.start())
    try:
        outcomes = deliver(destination, [event("track", messageId=f"m{n}", userId="bad\x00" if n == 2 else "u1")
                                         for n in range(5)])
    finally:
        asyncio.run(destination.close())
    assert [o.kind for o in outcomes] == ["delivered", "delivered", "rejected", "delivered", "delivered"]
    assert outcomes[2].reason == ("refused by the database: "
                                  "DataError: PostgreSQL text fields cannot contain NUL (0x00) bytes")
    assert [row["id"] for row in rows(postgres_url, "tracks")] == ["m0", "m1", "m3", "m4"]


def test_a_missing_table_means_retry_for_every_event(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    engine = sa.create_engine(warehouse_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE tracks"))
    engine.dispose()
    outcomes = deliver(warehouse, [event("identify"), event("track"), event("page")])
    assert [o.kind for o in outcomes] == ["retry", "retry", "retry"]
    assert outcomes[0].reason in ("OperationalError: no such table: tracks",
                                  'UndefinedTable: relation "tracks" does not exist')
    assert rows(warehouse_url, "identifies") == []  # one transaction: nothing of the chunk stays


def test_later_chunks_are_not_tried_after_a_database_failure(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    destination = DatabaseDestination("warehouse", DatabaseOptions(url=url), 1)
    asyncio.run(destination.start())
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE tracks"))
    engine.dispose()
    outcomes = deliver(destination, [event("identify"), event("track"), event("page")])
    asyncio.run(destination.close())
    assert [o.kind for o in outcomes] == ["delivered", "retry", "retry"]
    assert outcomes[1] == outcomes[2]
    assert rows(url, "pages") == []


@pytest.mark.postgres
def test_an_unreachable_database_means_retry_and_a_failed_check(postgres_url: str) -> None:
    url = postgres_url.replace("postgresql+psycopg://", "postgres://")  # normalised to psycopg 3
    destination = DatabaseDestination("warehouse", DatabaseOptions(url=url), 200)
    asyncio.run(destination.start())
    assert destination.engine is not None and destination.engine.url.drivername == "postgresql+psycopg"
    assert asyncio.run(destination.check()) is None
    admin = sa.create_engine(sa.make_url(postgres_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE "{sa.make_url(postgres_url).database}" WITH (FORCE)')
    admin.dispose()
    outcomes = deliver(destination, [event("track"), event("page")])
    check = asyncio.run(destination.check())
    asyncio.run(destination.close())
    assert [o.kind for o in outcomes] == ["retry", "retry"]
    assert outcomes[0].reason.startswith("OperationalError: ")
    assert check is not None and check.startswith("database unreachable: OperationalError: ")


def test_table_prefix_names_the_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    destination = DatabaseDestination("warehouse", DatabaseOptions(url=url, table_prefix="web_"), 200)
    asyncio.run(destination.start())
    deliver(destination, [event("alias")])
    asyncio.run(destination.close())
    engine = sa.create_engine(url)
    assert sorted(sa.inspect(engine).get_table_names()) == sorted(f"web_{t}" for t in TABLE_OF_TYPE.values())
    engine.dispose()
    assert [row["previous_id"] for row in rows(url, "aliases", prefix="web_")] == ["old-id"]


def test_start_keeps_existing_tables_and_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    for n in range(2):
        destination = DatabaseDestination("warehouse", DatabaseOptions(url=url), 200)
        asyncio.run(destination.start())
        deliver(destination, [event("track", messageId=f"m{n}")])
        asyncio.run(destination.close())
    assert [row["id"] for row in rows(url, "tracks")] == ["m0", "m1"]


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        DatabaseDestination("warehouse", DatabaseOptions(url="mysql://localhost/x"), 200)
    assert str(info.value) == ("database destination 'warehouse' url: unsupported scheme 'mysql', "
                               "use sqlite:/// or postgresql://")


# What the insert path could change: it hands the driver SQL compiled once and parameters it
# prepares itself (through the types' bind processors), instead of conn.execute(insert, rows).

# Numbers a double cannot hold, kept as their text (orjson.Fragment) by exactjson as the worker reads them.
EXACT_PROPERTIES = exactjson.loads(b'{"revenue":12345678901234567890123.5,"count":98765432109876543210,'
                                   b'"tiny":1e-400}')
EXACT_TRAITS = exactjson.loads(b'{"id":-18446744073709551617}')
VARIED = [
    {**COMMON, "type": "track", "messageId": "v-offsets", "event": "Größe ändern 🚀",
     "timestamp": "2026-11-26T12:00:00+02:00", "originalTimestamp": "2026-11-26T04:29:59.999999-05:30",
     "sentAt": "2026-11-26T10:00:01", "receivedAt": "2026-11-26T10:00:02.1Z",
     "properties": {"nested": {"list": [1, 2.5, None, True, {"deep": ["x"]}], "text": "é\u2028\u0301"},
                    "empty": {}, "none": None}},
    {**COMMON, "type": "track", "messageId": "v-old-year", "userId": 7, "anonymousId": "ユーザー",
     "timestamp": "0999-01-02T03:04:05.000001Z", "originalTimestamp": "9999-12-31T23:59:59.999999Z",
     "sentAt": "2026-02-28T23:59:59.5+00:00", "receivedAt": "2026-11-26T10:00:02.000Z",
     "properties": EXACT_PROPERTIES},
    {**COMMON, "type": "identify", "messageId": "v-big",
     "context": {**COMMON["context"], "ip": None, "screen": {"density": 2.625}}, "traits": EXACT_TRAITS},
]


def stored(url: str, table: str) -> list[tuple[Any, ...]]:
    """The rows of ``table`` as the driver reads them (SQLite: the stored text of times)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(f'SELECT * FROM "{table}" ORDER BY id')]
    finally:
        engine.dispose()


def stored_by_core(url: str, events: list[dict[str, Any]], loaded_at: datetime) -> None:
    """Insert ``events`` as the destination did before it compiled its own statements: through
    conn.execute(insert(table).on_conflict_do_nothing(...), rows), into tables prefixed "core_"."""
    metadata, tables = warehouse_tables("core_")
    insert = sqlite.insert if url.startswith("sqlite") else postgresql.insert
    engine = sa.create_engine(url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            for e in events:
                conn.execute(insert(tables[e["type"]]).on_conflict_do_nothing(index_elements=["id"]),
                             [event_row(e, loaded_at)])
    finally:
        engine.dispose()


def test_stored_values_are_what_sqlalchemy_core_stores(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    assert all(isinstance(v, exactjson.Fragment) for v in [*EXACT_PROPERTIES.values(), EXACT_TRAITS["id"]])
    assert deliver(warehouse, VARIED) == [DELIVERED] * 3
    [loaded_at] = {row["loaded_at"] for table in ("tracks", "identifies") for row in rows(warehouse_url, table)}
    stored_by_core(warehouse_url, VARIED, utc(loaded_at))  # type: ignore[arg-type]
    for table in ("tracks", "identifies"):
        assert stored(warehouse_url, table) == stored(warehouse_url, f"core_{table}")
    tracks = {row["id"]: row for row in rows(warehouse_url, "tracks")}
    assert utc(tracks["v-offsets"]["timestamp"]) == datetime(2026, 11, 26, 10, 0, tzinfo=timezone.utc)
    assert utc(tracks["v-offsets"]["original_timestamp"]) == datetime(2026, 11, 26, 9, 59, 59, 999999,
                                                                       tzinfo=timezone.utc)
    assert utc(tracks["v-old-year"]["timestamp"]) == datetime(999, 1, 2, 3, 4, 5, 1, tzinfo=timezone.utc)
    assert tracks["v-old-year"]["user_id"] == "7" and tracks["v-old-year"]["anonymous_id"] == "ユーザー"
    assert tracks["v-old-year"]["properties"] == ('{"revenue":12345678901234567890123.5,'
                                                  '"count":98765432109876543210,"tiny":1e-400}')
    assert tracks["v-offsets"]["event"] == "Größe ändern 🚀"
    [identify] = rows(warehouse_url, "identifies")
    assert identify["traits"] == '{"id":-18446744073709551617}' and identify["context_ip"] is None
    assert orjson.loads(identify["event_json"])["context"]["screen"] == {"density": 2.625}


def test_a_duplicate_id_keeps_the_first_row(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    first = event("track", messageId="dup", event="First")
    assert deliver(warehouse, [first, event("track", messageId="dup", event="Second"),
                               event("page", messageId="dup")]) == [DELIVERED] * 3
    other = event("track", messageId="other")
    assert deliver(warehouse, [event("track", messageId="dup", event="Third"), other]) == [DELIVERED] * 2
    assert [(row["id"], row["event"], row["event_json"]) for row in rows(warehouse_url, "tracks")] == [
        ("dup", "First", orjson.dumps(first).decode()), ("other", "Signed Up", orjson.dumps(other).decode())]
    assert [row["id"] for row in rows(warehouse_url, "pages")] == ["dup"]  # a table of its own


def refuse_user(url: str, user_id: str) -> None:
    """A trigger that makes the database refuse, as a constraint would, a track row of ``user_id``."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            if url.startswith("sqlite"):
                conn.exec_driver_sql(f"CREATE TRIGGER refuse BEFORE INSERT ON tracks WHEN NEW.user_id = '{user_id}' "
                                     "BEGIN SELECT RAISE(ABORT, 'user refused'); END")
            else:
                conn.exec_driver_sql(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    f"IF NEW.user_id = '{user_id}' THEN "
                    "RAISE EXCEPTION 'user refused' USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$")
                conn.exec_driver_sql("CREATE TRIGGER refuse BEFORE INSERT ON tracks "
                                     "FOR EACH ROW EXECUTE FUNCTION refuse()")
    finally:
        engine.dispose()


def test_a_row_refused_by_a_constraint_is_rejected_alone(warehouse: DatabaseDestination, warehouse_url: str) -> None:
    refuse_user(warehouse_url, "refused")
    outcomes = deliver(warehouse, [event("identify"), event("track", messageId="t1"),
                                   event("track", messageId="t2", userId="refused"), event("page"),
                                   event("track", messageId="t3")])
    assert [o.kind for o in outcomes] == ["delivered", "delivered", "rejected", "delivered", "delivered"]
    assert outcomes[2].reason in ("refused by the database: IntegrityError: user refused",
                                  "refused by the database: CheckViolation: user refused")
    assert [row["id"] for row in rows(warehouse_url, "tracks")] == ["t1", "t3"]
    assert [row["id"] for row in rows(warehouse_url, "identifies")] == ["m-identify"]
    assert [row["id"] for row in rows(warehouse_url, "pages")] == ["m-page"]

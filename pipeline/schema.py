"""The tables, as one SQLAlchemy Core ``metadata`` that Alembic migrations are checked against."""

from __future__ import annotations

from sqlalchemy import (BigInteger, Column, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, SmallInteger,
                        String, Table, Text, UniqueConstraint, text)

# Naming convention so that constraint names are the same on SQLite and Postgres and Alembic
# batch mode can find them again.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BIGINT on Postgres; INTEGER on SQLite, where only "INTEGER PRIMARY KEY" is the rowid alias
# that autoincrements.
Id = BigInteger().with_variant(Integer(), "sqlite")

# One row per accepted HTTP request, written before the 200 is sent. The body is the raw
# decompressed bytes as received; the pipeline decodes it later.
outbox = Table(
    "outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # Milliseconds since the Unix epoch, UTC: the same integer on every backend.
    Column("received_at_ms", BigInteger, nullable=False),
    # "track", "batch", "webhook", "pixel/page"...: what the pipeline needs to expand the body.
    Column("route", String(32), nullable=False),
    # Never NULL: open mode stores "default" so uniqueness on (source, messageId) holds.
    Column("source", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("remote_addr", Text, nullable=True),
    Column("user_agent", Text, nullable=True),
    # The HTTP Basic username: the write key of messages that carry none of their own.
    Column("auth_key", Text, nullable=True),
    # The webhook ?writeKey=, which overrides every key in the body.
    Column("override_key", Text, nullable=True),
    # pending -> done (decoded by the pipeline).
    Column("state", String(16), nullable=False, server_default="pending"),
    Index("ix_outbox_state_id", "state", "id"),
)

# What the receiver refused whole (400, 413, invalid pixels) and, later, the failed items of a
# 207 batch as the pipeline decodes them: where an operator sees why data did not go on.
rejected = Table(
    "rejected",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("received_at_ms", BigInteger, nullable=False),
    Column("route", String(32), nullable=False),
    Column("source", Text, nullable=True),
    Column("status", SmallInteger, nullable=False),
    Column("code", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    # The input as received, cut to a few KB: enough to see what was wrong, never a flood.
    Column("raw", LargeBinary, nullable=True),
    Column("remote_addr", Text, nullable=True),
    Index("ix_rejected_received_at_ms", "received_at_ms"),
)

# One row per accepted message, normalised. (source, message_id) is unique: a resent message
# is not accepted twice while its event is kept (the deduplication window).
events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("source", Text, nullable=False),
    Column("message_id", String(100), nullable=False),
    Column("type", String(16), nullable=False),
    Column("event_name", Text, nullable=True),
    # Whose event it is: the userId, else the anonymousId, as text (a number as its JSON
    # digits). The console finds a user's events by it (migration 0005). Not indexed: an index
    # cost the worker's drain about 15% in R4 (SQLite: 13.3-19.2k events/s against 15.8-21.2k,
    # alternating runs); the column alone was within the noise (15.4-20.4k against 17.4-20.8k).
    # A search by user reads the events newest first until its page is full.
    Column("user_id", Text, nullable=True),
    # The outbox row it came from; not a foreign key, since raw requests are kept for less time.
    Column("outbox_id", BigInteger, nullable=True),
    Column("received_at_ms", BigInteger, nullable=False),
    # The normalised event as delivered downstream (JSON bytes).
    Column("payload", LargeBinary, nullable=False),
    UniqueConstraint("source", "message_id", name="uq_events_source_message_id"),
    Index("ix_events_received_at_ms", "received_at_ms"),
)

# One row per (event, destination). A claim leases the row (locked_until_ms), so a crashed
# worker's claims are simply due again when the lease runs out, and a claim is one index range
# scan, over the due rows and those in flight, however large the backlog (the index ends with
# id, the tie-break of the claim order, so no sort is needed). On Postgres pages are filled to
# 40% (migration 0004): a claim leases every row of a page within moments, and each lease's new
# row version then still fits on the page, a HOT update that adds no index entries
# (pipeline.queue). Half a page is not enough: the leased version is longer than the row as
# inserted (locked_by, locked_until_ms and last_attempt_at_ms filled in), and the outcome's
# version often lands on the page too. Measured in a 200k drain: at 70% 61k of 200k claims were
# HOT, at 50% 142k, at 40% 198.6k.
DELIVERIES_FILLFACTOR = 40
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", BigInteger().with_variant(Integer(), "sqlite"),
           ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("destination", Text, nullable=False),
    # pending (waiting, in flight or retrying) -> delivered | dead
    Column("state", String(16), nullable=False),
    # Attempts started, counted at claim time so that a worker that dies mid-delivery still
    # uses one up.
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("next_attempt_at_ms", BigInteger, nullable=False),
    Column("locked_until_ms", BigInteger, nullable=True),
    Column("locked_by", String(64), nullable=True),
    Column("last_attempt_at_ms", BigInteger, nullable=True),
    Column("finished_at_ms", BigInteger, nullable=True),
    Column("last_error", Text, nullable=True),
    # Whose event it is (events.user_id), copied at fan-out only for a destination with
    # ordering = "user": a delivery with a user_key is claimed only once no earlier delivery of
    # that user to that destination is pending (pipeline.queue). NULL means unordered.
    Column("user_key", Text, nullable=True),
    Index("ix_deliveries_claim", "destination", "state", "next_attempt_at_ms", "id"),
    # The claim's "an earlier delivery of this user is pending" probe (migration 0007). Partial:
    # only ordered deliveries still pending are in it, so unordered destinations never write to
    # it, and it stays as small as the ordered backlog.
    Index("ix_deliveries_user_order", "destination", "user_key", "id",
          postgresql_where=text("state = 'pending' AND user_key IS NOT NULL"),
          sqlite_where=text("state = 'pending' AND user_key IS NOT NULL")),
    Index("ix_deliveries_event_id", "event_id"),
    Index("ix_deliveries_state_finished_at_ms", "state", "finished_at_ms"),
    postgresql_with={"fillfactor": DELIVERIES_FILLFACTOR},
)

# Each worker's concurrency controller per destination (migration 0006), written every few
# seconds by the worker for the processes that show it (status, console, /metrics).
delivery_controllers = Table(
    "delivery_controllers",
    metadata,
    Column("destination", Text, primary_key=True),
    Column("worker", String(64), primary_key=True),  # host:pid
    Column("mode", String(16), nullable=False),  # adaptive | fixed
    Column("concurrency_limit", Integer, nullable=False),
    Column("max_concurrency", Integer, nullable=False),
    Column("in_flight", Integer, nullable=False),
    Column("rtt_ms", Float, nullable=True),  # the last window's mean round-trip time
    Column("baseline_rtt_ms", Float, nullable=True),
    Column("updated_at_ms", BigInteger, nullable=False),
)

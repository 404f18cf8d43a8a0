"""The SQLite writer gate (pipeline.store.WriterGate): the write transactions of one engine take
turns, first come first served, instead of racing for SQLite's write lock; the gate never
hangs a thread that waits for itself, and is given back however a transaction ends."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline.config import DatabaseConfig
from pipeline.store import WriterGate, create_store_engine, engine_gates
from pipeline_harness import wait_for

THREADS = 16
WRITES = 40


@pytest.fixture
def engine(tmp_path: Path) -> sa.Engine:
    # A lock timeout short next to the time a thread waits when it loses the race for the
    # write lock without the gate: SQLite's busy handler then sleeps 1, 2, 5 ... 100 ms, and
    # a thread that commits takes the lock again before any sleeper wakes up.
    made = create_store_engine(DatabaseConfig(url=f"sqlite:///{tmp_path / 'gate.db'}", lock_timeout_seconds=0.25))
    with made.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (thread INTEGER, n INTEGER)")
    yield made
    made.dispose()


def run_threads(work, count: int = THREADS) -> list[BaseException]:  # type: ignore[no-untyped-def]
    errors: list[BaseException] = []

    def guarded(number: int) -> None:
        try:
            work(number)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a writer hung"
    return errors


def test_many_threads_writing_through_one_engine_all_commit(engine: sa.Engine) -> None:
    def write(number: int) -> None:
        for n in range(WRITES):
            with engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (?, ?)", (number, n))
                # Hold the write lock a little, as a claim or a record does.
                conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one()

    assert run_threads(write) == []
    with engine.connect().execution_options(readonly=True) as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == THREADS * WRITES
    assert engine_gates[engine].waiting == 0


def test_a_connection_keeps_its_turn_across_two_transactions_and_gives_it_back(engine: sa.Engine) -> None:
    others_done = threading.Event()

    def other(_: int) -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1, 1)")
        others_done.set()

    with engine.connect() as conn:
        with conn.begin():
            conn.exec_driver_sql("INSERT INTO t VALUES (0, 1)")
        waiter = threading.Thread(target=run_threads, args=(other, 1))
        waiter.start()
        wait_for(lambda: engine_gates[engine].waiting == 1, "the other writer in line")
        with conn.begin():  # its own turn still: no wait for the writer behind it
            conn.exec_driver_sql("INSERT INTO t VALUES (0, 2)")
        assert not others_done.is_set()
    # Back in the pool: the gate goes to the writer in line.
    wait_for(others_done.is_set, "the other writer to commit")
    waiter.join(30)
    with engine.connect().execution_options(readonly=True) as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 3


def test_a_nested_write_connection_in_one_thread_fails_instead_of_hanging(engine: sa.Engine) -> None:
    outcome: list[object] = []

    def nested(_: int) -> None:
        with engine.begin() as outer:
            outer.exec_driver_sql("INSERT INTO t VALUES (0, 1)")
            try:
                with engine.begin() as inner:  # waits for the outer one: SQLite's lock timeout
                    inner.exec_driver_sql("INSERT INTO t VALUES (0, 2)")
            except sa.exc.OperationalError as exc:
                outcome.append(exc)

    assert run_threads(nested, 1) == []
    assert len(outcome) == 1 and "database is locked" in str(outcome[0])
    with engine.begin() as conn:  # the gate was given back
        conn.exec_driver_sql("INSERT INTO t VALUES (0, 3)")
    with engine.connect().execution_options(readonly=True) as conn:
        assert conn.exec_driver_sql("SELECT n FROM t ORDER BY n").scalars().all() == [1, 3]


def test_the_gate_is_given_back_after_a_rollback(engine: sa.Engine) -> None:
    with pytest.raises(sa.exc.OperationalError), engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO no_such_table VALUES (1)")
    assert run_threads(lambda n: _insert(engine, n), 2) == []
    assert engine_gates[engine].waiting == 0


def _insert(engine: sa.Engine, number: int) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (?, 0)", (number,))


def test_a_writer_that_waited_out_the_timeout_in_line_goes_on_and_sqlite_decides(engine: sa.Engine) -> None:
    """The wait in line counts against the lock timeout: a writer stuck behind a transaction
    that holds the lock past it fails (the caller answers 503), as it did without the gate."""
    holding, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def holder(_: int) -> None:
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (0, 0)")
            holding.set()
            release.wait(30)

    def late(_: int) -> None:
        try:
            _insert(engine, 1)
        except sa.exc.OperationalError as exc:
            failures.append(exc)
        finally:
            release.set()

    first = threading.Thread(target=run_threads, args=(holder, 1))
    first.start()
    holding.wait(30)
    assert run_threads(late, 1) == []
    first.join(30)
    assert len(failures) == 1 and "database is locked" in str(failures[0])
    _insert(engine, 2)  # nobody holds the gate any more


def test_the_gate_hands_over_in_arrival_order() -> None:
    gate, first = WriterGate(), {"name": "first"}
    assert gate.enter(first, 1.0) == 0.0
    order: list[str] = []
    holders = [{"name": f"w{n}"} for n in range(5)]

    def wait_turn(number: int) -> None:
        gate.enter(holders[number], 30.0)
        order.append(holders[number]["name"])
        gate.leave(holders[number])

    threads = []
    for number in range(5):
        threads.append(threading.Thread(target=wait_turn, args=(number,)))
        threads[-1].start()
        wait_for(lambda: gate.waiting == number + 1, "the writer in line")
    gate.leave(first)
    for thread in threads:
        thread.join(30)
    assert order == [f"w{n}" for n in range(5)]
    gate.leave(first)  # leaving without holding it does nothing
    assert gate.waiting == 0

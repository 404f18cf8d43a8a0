"""A worker stops, with a clear line, the moment its database is migrated past its own schema:
an old worker left running after `trackrelay migrate` must not claim deliveries in flight."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from pipeline_harness import Processes, webhook, write_config


def test_a_running_worker_stops_when_the_schema_moves_past_it(database_url: str, tmp_path: Path) -> None:
    path = write_config(tmp_path / "trackrelay.toml", database_url, [webhook("http://127.0.0.1:9/in")])
    processes = Processes(tmp_path)
    try:
        worker = processes.start("worker", "--config", str(path))
        worker.wait_for_log("event=started role=worker")
        engine = sa.create_engine(database_url)
        with engine.begin() as conn:
            revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
            # What a newer version's `trackrelay migrate` leaves behind.
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f0f0f0f0f0f0'"))
        engine.dispose()
        assert worker.wait() == 1
        assert (f"event=schema_changed found=f0f0f0f0f0f0 expected={revision} action=stopping" in worker.log), \
            worker.log
        assert "event=stopped role=worker" in worker.log
    finally:
        processes.kill_leftovers()

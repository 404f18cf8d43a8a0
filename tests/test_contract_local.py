"""The adapter contract suite on the local destinations: file, database and log."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from pipeline.destinations.contract import DestinationContract
from pipeline.destinations.database import DatabaseDestination, DatabaseOptions, warehouse_tables
from pipeline.destinations.file import FileDestination, FileOptions
from pipeline.destinations.log import LogDestination, LogOptions


class TestFileContract(DestinationContract):
    @pytest.fixture(autouse=True)
    def directory(self, tmp_path: Path) -> None:
        self.directory = tmp_path / "events"

    def make_destination(self, batch_size: int) -> FileDestination:
        return FileDestination("archive", FileOptions(path=str(self.directory), max_bytes=4096), batch_size)

    def received_ids(self) -> set[str]:
        return {orjson.loads(line)["messageId"]
                for path in self.directory.glob("*.jsonl") for line in path.read_bytes().splitlines()}


class TestDatabaseContract(DestinationContract):
    @pytest.fixture(autouse=True)
    def database(self, tmp_path: Path) -> None:
        self.url = f"sqlite:///{tmp_path / 'warehouse.db'}"

    def make_destination(self, batch_size: int) -> DatabaseDestination:
        return DatabaseDestination("warehouse", DatabaseOptions(url=self.url), batch_size)

    def received_ids(self) -> set[str]:
        _, tables = warehouse_tables()
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                return {id_ for table in tables.values() for id_ in conn.execute(sa.select(table.c.id)).scalars()}
        finally:
            engine.dispose()


@pytest.mark.postgres
class TestDatabaseContractOnPostgres(TestDatabaseContract):
    @pytest.fixture(autouse=True)
    def database(self, postgres_url: str) -> None:
        self.url = postgres_url


class TestLogContract(DestinationContract):
    @pytest.fixture(autouse=True)
    def records(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.INFO, logger="trackrelay.destination.console")
        self.caplog = caplog

    def make_destination(self, batch_size: int) -> LogDestination:
        return LogDestination("console", LogOptions(), batch_size)

    def received_ids(self) -> set[str]:
        return {orjson.loads(record.getMessage().split(" payload=", 1)[1])["messageId"]
                for record in self.caplog.records if record.name == "trackrelay.destination.console"}

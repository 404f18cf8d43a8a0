"""The adapter contract suite on the HTTP adapters, each against a real sink."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from http_sink import HttpSink
from pipeline.destinations.contract import DestinationContract
from pipeline.destinations.segment import SegmentDestination, SegmentOptions
from pipeline.destinations.webhook import WebhookDestination, WebhookOptions


def message_ids(bodies: list[Any]) -> set[str]:
    return {event["messageId"] for body in bodies for event in (body["batch"] if "batch" in body else [body])}


class TestWebhookContract(DestinationContract):
    @pytest.fixture(autouse=True)
    def sink(self) -> Iterator[HttpSink]:
        self.sink = HttpSink()
        yield self.sink
        self.sink.stop()

    def make_destination(self, batch_size: int) -> WebhookDestination:
        return WebhookDestination("hook", WebhookOptions(url=self.sink.url + "/in"), batch_size)

    def received_ids(self) -> set[str]:
        return message_ids(self.sink.bodies())


class TestSegmentContract(DestinationContract):
    """Forwarding to a real trackrelay receiver, on each storage backend."""

    @pytest.fixture(autouse=True)
    def receiver(self, start_receiver: Any) -> None:
        self.receiver = start_receiver(sources={"fwd": ["k1"]})

    def make_destination(self, batch_size: int) -> SegmentDestination:
        return SegmentDestination("seg", SegmentOptions(url=self.receiver.url, write_key="k1", gzip=True), batch_size)

    def received_ids(self) -> set[str]:
        return message_ids([json.loads(row["body"]) for row in self.receiver.outbox() if row["source"] == "fwd"])

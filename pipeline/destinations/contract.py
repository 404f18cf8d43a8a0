"""The contract every destination adapter passes, built-in or not: a pytest mixin.

A package that adds a destination runs it in its own tests: subclass
:class:`DestinationContract`, set up a real sink for each test (an autouse fixture in the
subclass, storing what it needs on ``self``), and implement two methods:

- ``make_destination(batch_size)``: a new, not yet started adapter delivering to that sink;
- ``received_ids()``: the ``messageId`` of every event that reached the sink so far (read from
  the sink itself, after the adapter was closed, outside any event loop).

Example::

    import pytest
    from pipeline.destinations.contract import DestinationContract
    from mypackage.destination import KafkaDestination

    class TestKafkaContract(DestinationContract):
        @pytest.fixture(autouse=True)
        def topic(self, kafka_topic):  # your own fixture, giving a fresh real topic
            self.topic = kafka_topic

        def make_destination(self, batch_size):
            options = KafkaDestination.Options(brokers="127.0.0.1:9092", topic=self.topic.name)
            return KafkaDestination("kafka", options, batch_size)

        def received_ids(self):
            return {event["messageId"] for event in self.topic.read_all()}

Each contract test runs for the batch sizes of the ``contract_batch_size`` fixture (1 and 3);
a subclass may override that fixture. pytest is needed only to run this suite.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from pipeline.destinations.base import Destination, Event, Outcome

T = TypeVar("T")
STANDARD_FIELDS = ("userId", "anonymousId", "event", "name", "groupId", "previousId", "properties",
                   "traits", "context", "integrations", "timestamp", "originalTimestamp", "sentAt",
                   "receivedAt")


def contract_events(count: int) -> list[Event]:
    """``count`` valid normalised events of every type, with unicode and nested properties."""
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("track", {"event": "Commande passée ☕", "properties": {
            "total": 12.5, "items": [{"sku": "É-1", "qty": 2}, {"sku": "日本-2", "qty": 1}],
            "meta": {"nested": {"deep": [1, "two", None, True]}}}}),
        ("identify", {"traits": {"name": "Zoë Ångström 🚀", "address": {"city": "Zürich"}}}),
        ("page", {"name": "Главная", "properties": {"path": "/ü?q=ß", "title": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"}}),
        ("screen", {"name": "Home — 首页", "properties": {}}),
        ("group", {"groupId": "g-ü-1", "traits": {"plan": "enterprise", "seats": 10}}),
        ("alias", {"previousId": "anon-😀"}),
    ]
    events = []
    for i in range(count):
        kind, fields = kinds[i % len(kinds)]
        events.append({
            "type": kind, "messageId": f"contract-{uuid.uuid4()}", "userId": f"user-{i}-ø",
            "anonymousId": None, **fields,
            "context": {"ip": "127.0.0.1", "library": {"name": "analytics-python", "version": "2.4.0"},
                        "locale": "fr-FR"},
            "integrations": {}, "timestamp": "2026-11-26T10:00:00.000Z",
            "originalTimestamp": "2026-11-26T10:00:00.000Z", "sentAt": "2026-11-26T10:00:01.000Z",
            "receivedAt": "2026-11-26T10:00:01.500Z",
        })
    return events


def null_event() -> Event:
    """A track whose every standard field but type and messageId is null."""
    return {"type": "track", "messageId": f"contract-null-{uuid.uuid4()}",
            **{key: None for key in STANDARD_FIELDS}}


async def while_started(destination: Destination, use: Callable[[Destination], Awaitable[T]]) -> T:
    """Start ``destination``, run ``use`` on it, and close it whatever happens."""
    await destination.start()
    try:
        return await use(destination)
    finally:
        await destination.close()


class DestinationContract:
    """Contract tests for one adapter; see the module docstring for how to use it."""

    def make_destination(self, batch_size: int) -> Destination:
        raise NotImplementedError("a DestinationContract subclass returns its adapter, not started")

    def received_ids(self) -> set[str]:
        raise NotImplementedError("a DestinationContract subclass reads the messageIds its sink received")

    @pytest.fixture(params=[1, 3], ids=lambda size: f"batch_size={size}")
    def contract_batch_size(self, request: pytest.FixtureRequest) -> int:
        return request.param

    def test_starts_and_closes_without_deliveries(self, contract_batch_size: int) -> None:
        destination = self.make_destination(contract_batch_size)
        assert isinstance(destination, Destination)
        assert destination.batch_size == contract_batch_size

        async def nothing(_: Destination) -> None:
            return None

        asyncio.run(while_started(destination, nothing))

    def test_delivering_no_events_answers_no_outcomes(self, contract_batch_size: int) -> None:
        destination = self.make_destination(contract_batch_size)
        assert asyncio.run(while_started(destination, lambda d: d.deliver([]))) == []

    def test_delivers_every_event_and_answers_each_in_order(self, contract_batch_size: int) -> None:
        events = contract_events(3 * contract_batch_size + 1)
        destination = self.make_destination(contract_batch_size)
        outcomes = asyncio.run(while_started(destination, lambda d: d.deliver(events)))
        assert isinstance(outcomes, list) and all(isinstance(o, Outcome) for o in outcomes), outcomes
        assert [(o.kind, o.reason) for o in outcomes if not o.delivered] == []
        assert len(outcomes) == len(events)
        missing = {event["messageId"] for event in events} - self.received_ids()
        assert missing == set(), f"{len(missing)} delivered events never reached the sink"

    def test_check_answers_none_or_a_description(self, contract_batch_size: int) -> None:
        destination = self.make_destination(contract_batch_size)
        answer = asyncio.run(while_started(destination, lambda d: d.check()))
        assert answer is None or (isinstance(answer, str) and answer), answer

    def test_an_event_with_null_standard_fields_gets_an_outcome(self, contract_batch_size: int) -> None:
        destination = self.make_destination(contract_batch_size)
        outcomes = asyncio.run(while_started(destination, lambda d: d.deliver([null_event()])))
        assert len(outcomes) == 1 and isinstance(outcomes[0], Outcome), outcomes
        assert outcomes[0].kind in ("delivered", "retry", "rejected"), outcomes

"""pipeline.routing.Router: the source's destinations, Segment's integrations object, filters (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.config import DestinationConfig, SourceConfig
from pipeline.routing import Router


def destination(name: str, **settings: Any) -> DestinationConfig:
    return DestinationConfig(name=name, type="log", options=None, batch_size=1, **settings)


HOOK = destination("hook")
WAREHOUSE = destination("warehouse")
MIXPANEL = destination("mp", aliases=("Mixpanel", "Mixpanel (Actions)"))
ALL = (HOOK, WAREHOUSE, MIXPANEL)


def track(name: str = "Signed Up", **fields: Any) -> dict[str, Any]:
    return {"type": "track", "event": name, "userId": "u1", **fields}


def route(event: dict[str, Any], destinations: tuple[DestinationConfig, ...] = ALL,
          sources: tuple[SourceConfig, ...] = (), source: str = "default") -> list[str]:
    return Router(destinations, sources).destinations_for(source, event)


def test_open_mode_sends_every_event_to_every_destination() -> None:
    assert route(track()) == ["hook", "warehouse", "mp"]


def test_a_source_without_a_list_sends_to_every_destination() -> None:
    sources = (SourceConfig("web", ("wk_web",)), SourceConfig("app", ("wk_app",), ("warehouse",)))

    assert route(track(), sources=sources, source="web") == ["hook", "warehouse", "mp"]


def test_a_source_with_a_list_sends_only_to_those_destinations() -> None:
    sources = (SourceConfig("web", ("wk_web",)), SourceConfig("app", ("wk_app",), ("warehouse", "mp")))

    assert route(track(), sources=sources, source="app") == ["warehouse", "mp"]


def test_a_source_with_an_empty_list_sends_nowhere() -> None:
    sources = (SourceConfig("quiet", ("wk_q",), ()),)

    assert route(track(), sources=sources, source="quiet") == []


@pytest.mark.parametrize("integrations", [None, {}, {"All": True}, {"Other": False}, "not an object"])
def test_all_defaults_to_true(integrations: Any) -> None:
    assert route(track(integrations=integrations)) == ["hook", "warehouse", "mp"]


def test_a_destination_name_set_to_false_excludes_it() -> None:
    assert route(track(integrations={"hook": False})) == ["warehouse", "mp"]


@pytest.mark.parametrize("alias", ["Mixpanel", "Mixpanel (Actions)"])
def test_an_alias_set_to_false_excludes_the_destination_that_has_it(alias: str) -> None:
    assert route(track(integrations={alias: False})) == ["hook", "warehouse"]


def test_all_false_excludes_every_destination_not_named() -> None:
    assert route(track(integrations={"All": False})) == []


@pytest.mark.parametrize("value", [True, {}, {"apiKey": "k"}])
def test_all_false_with_a_destination_set_to_true_or_an_object_includes_only_it(value: Any) -> None:
    assert route(track(integrations={"All": False, "hook": value})) == ["hook"]


def test_all_false_with_an_alias_set_to_true_includes_its_destination() -> None:
    assert route(track(integrations={"All": False, "Mixpanel": True})) == ["mp"]


def test_types_filter_keeps_only_those_message_types() -> None:
    identities = destination("crm", types=("identify", "group"))

    assert route({"type": "identify", "userId": "u1"}, (HOOK, identities)) == ["hook", "crm"]
    assert route({"type": "group", "userId": "u1", "groupId": "g"}, (HOOK, identities)) == ["hook", "crm"]
    assert route(track(), (HOOK, identities)) == ["hook"]


def test_events_filter_keeps_only_those_track_events() -> None:
    orders = destination("orders", events=("Order Completed", "Order Refunded"))

    assert route(track("Order Completed"), (HOOK, orders)) == ["hook", "orders"]
    assert route(track("Signed Up"), (HOOK, orders)) == ["hook"]


def test_events_filter_lets_other_message_types_pass() -> None:
    orders = destination("orders", events=("Order Completed",))

    assert route({"type": "identify", "userId": "u1"}, (orders,)) == ["orders"]
    assert route({"type": "page", "anonymousId": "a1", "name": "Home"}, (orders,)) == ["orders"]


def test_filters_and_integrations_both_apply() -> None:
    orders = destination("orders", types=("track",), events=("Order Completed",))

    assert route(track("Order Completed", integrations={"orders": False}), (orders,)) == []
    assert route(track("Order Completed", integrations={"All": False, "orders": True}), (orders,)) == ["orders"]
    assert route(track("Signed Up", integrations={"All": False, "orders": True}), (orders,)) == []

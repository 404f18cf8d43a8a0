"""deploy/grafana-dashboard.json and deploy/prometheus-alerts.yml: they parse, every alert rule
is complete, and every trackrelay_* metric they query is one a real /metrics scrape serves
(after an event was accepted, refused and delivered, so every family has samples)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import yaml

from conftest import unique_id
from console_harness import RunningConsole, with_console
from pipeline_harness import Pipeline, ScriptedSink, wait_for, webhook

DEPLOY = Path(__file__).parent.parent / "deploy"
_NAME = re.compile(r"\btrackrelay_[a-z_]+")
_SUFFIX = re.compile(r"_(bucket|sum|count|created)$")


def used_names(text: str) -> set[str]:
    return {_SUFFIX.sub("", name) for name in _NAME.findall(text)}


def test_the_alert_rules_are_complete() -> None:
    rules = [rule for group in yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())["groups"]
             for rule in group["rules"]]
    assert len(rules) >= 4
    for rule in rules:
        assert rule["alert"] and rule["expr"] and rule["for"], rule
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"], rule


def test_every_metric_the_dashboard_and_alerts_use_is_served(start_pipeline: Callable[..., Pipeline],
                                                             sink: ScriptedSink) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dashboard["panels"] and dashboard["templating"]["list"]
    used = used_names((DEPLOY / "grafana-dashboard.json").read_text()) | \
        used_names((DEPLOY / "prometheus-alerts.yml").read_text())
    assert len(used) >= 8
    pipeline = start_pipeline([webhook(sink.url + "/good", name="good")])
    assert pipeline.receiver.post("/v1/track", {"userId": "u", "event": "E", "messageId": unique_id()}
                                  ).status_code == 200
    assert pipeline.receiver.post("/v1/track", {"event": "no user"}).status_code == 400
    wait_for(lambda: pipeline.db.settled(1), "the event to be delivered")
    running = RunningConsole(with_console(pipeline.config))
    try:
        def served() -> set[str]:
            text = running.get("/metrics").text
            return {_SUFFIX.sub("", line.split("{")[0].split(" ")[0]) for line in text.splitlines()
                    if line.startswith("trackrelay_")}
        names = wait_for(lambda: used <= served() and served(), "the receiver's counts to be folded in")
        assert used <= names, sorted(used - names)
    finally:
        running.stop()

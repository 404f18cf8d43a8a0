"""The metrics' parts, one process: bounded labels, folding counts into histograms, the
multiprocess folder (its choice, the files of dead processes, its removal).

Counts across real processes and the database gauges: tests/test_metrics_processes.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import Histogram, generate_latest, values
from prometheus_client.parser import text_string_to_metric_families

from conftest import RunningReceiver
from pipeline import metrics
from pipeline.metrics import DURATION_BUCKETS, add_buckets, metrics_folder, process_metrics, source_registry
from receiver.counts import Buckets, RequestCounts


def scraped(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def current() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return scraped(generate_latest(source_registry()).decode())


def requests_by_route() -> dict[tuple[str, str], float]:
    return {(dict(labels)["route"], dict(labels)["status"]): value for (name, labels), value in current().items()
            if name == "trackrelay_http_requests_total"}


def test_a_value_on_a_bound_falls_in_that_bounds_bucket_as_le_says() -> None:
    buckets = Buckets((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 1.5):
        buckets.observe(value)
    assert buckets.counts == [1, 2, 1] and buckets.total == pytest.approx(3.1)


@pytest.mark.parametrize("multiprocess", [False, True])
def test_folded_buckets_equal_observing_each_value(tmp_path: Path, multiprocess: bool) -> None:
    observations = [0.0005, 0.001, 0.003, 0.003, 0.2, 7.0, 99.0]
    folder = str(tmp_path / "mp") if multiprocess else ""
    with metrics_folder(folder, private=multiprocess) as path:
        assert (path is not None) == multiprocess == metrics.multiprocess()
        observed = Histogram("t_observed_seconds", "t", buckets=DURATION_BUCKETS, registry=None)
        folded = Histogram("t_folded_seconds", "t", buckets=DURATION_BUCKETS, registry=None)
        counted = Buckets(DURATION_BUCKETS)
        for value in observations:
            observed.observe(value)
            counted.observe(value)
        add_buckets(folded, counted.counts, counted.total)

        def samples(histogram: Histogram) -> list[tuple[str, dict[str, str], float]]:
            family = next(iter(histogram.collect()))
            return [(s.name.split("_seconds")[1], s.labels, s.value) for s in family.samples if "created" not in s.name]

        assert samples(folded) == samples(observed)
        totals = {name: value for name, _, value in samples(folded) if name in ("_count", "_sum")}
        assert totals == {"_count": 7.0, "_sum": pytest.approx(sum(observations))}
    assert not metrics.multiprocess()


def test_the_private_folder_is_made_for_the_command_and_removed_after(tmp_path: Path) -> None:
    with metrics_folder("", private=True) as path:
        assert path is not None and os.path.isdir(path) and os.environ[metrics.FOLDER_ENV] == path
        process_metrics().rejected.labels("some_reason").inc()
        assert any(name.startswith("counter_") for name in os.listdir(path))
    assert not os.path.exists(path)
    assert metrics.FOLDER_ENV not in os.environ and values.ValueClass is values.MutexValue
    process_metrics().rejected.labels("after").inc()  # metrics built afterwards stay in memory


def test_a_dead_processes_counters_are_kept_and_its_live_gauges_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    with metrics_folder(str(folder)):
        pid = os.fork()
        if pid == 0:  # the child: what a receiver process leaves behind
            try:
                built = process_metrics()
                built.http_requests.labels("track", "200").inc(5)
                built.requests_in_progress.set(3)
            finally:
                os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert {f"counter_{pid}.db", f"gauge_livesum_{pid}.db"} <= set(os.listdir(folder))
        assert metrics.sweep_dead(str(folder)) == 1
        files = set(os.listdir(folder))
        assert f"counter_{pid}.db" in files and f"gauge_livesum_{pid}.db" not in files
        figures = current()
        assert figures[("trackrelay_http_requests_total", frozenset({("route", "track"), ("status", "200")}))] == 5
        assert ("trackrelay_requests_in_progress", frozenset()) not in figures  # not the dead one's 3


def test_paths_no_route_serves_share_one_label_and_routes_are_named(
        start_receiver: Callable[..., RunningReceiver]) -> None:
    before = requests_by_route()
    receiver = start_receiver(sources={"web": ["k-web"]})
    for path in ("/nope", "/v2/track", "/v1/track/extra?userId=secret-user", "/v1/projects"):
        assert receiver.get(path).status_code == 404
    assert receiver.post("/v1/t", {"type": "track", "event": "e", "userId": "u"}, auth=("k-web", "")).status_code == 200
    assert receiver.client.options("/v1/batch").status_code == 204
    assert receiver.get("/v1/pixel/page", params={"userId": "u", "writeKey": "k-web"}).status_code == 200
    receiver.stop()  # the last fold runs as it stops
    after = requests_by_route()
    grown = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert grown == {("unknown", "404"): 4, ("track", "200"): 1, ("batch", "204"): 1, ("pixel/page", "200"): 1}


def test_counts_taken_while_folding_are_not_lost() -> None:
    counts = RequestCounts()
    counts.answered("track", 200, 0.001)
    before = requests_by_route().get(("track", "200"), 0)
    counts.fold()
    counts.answered("track", 200, 0.001)  # after the swap: the next fold's
    assert requests_by_route()[("track", "200")] == before + 1
    counts.fold()
    assert requests_by_route()[("track", "200")] == before + 2


def test_a_batchs_delivery_lags_are_folded_as_observing_each_would() -> None:
    """count_attempts folds a claimed batch's lags into the histogram at once: the same buckets,
    count and sum as one observe() per delivered event; retries and dead ones have no lag."""
    destination = f"lag-{os.getpid()}-{id(object())}"
    now = 1_000_000_000
    lags = [0.0, 0.05, 0.051, 0.1, 2.0, 5.0, 7.5, 10800.0, 10800.5, 99999.0]
    attempts = [("delivered", "delivered", now - round(lag * 1000)) for lag in lags]
    attempts += [("retry", "pending", now - 1000), ("rejected", "dead", now - 1000), ("retry", "dead", now - 5)]
    attempts.append(("delivered", "delivered", now + 2000))  # a clock that stepped back: lag 0, not negative
    metrics.count_attempts(destination, attempts, now)
    expected = Histogram("t_expected_lag_seconds", "t", buckets=metrics.LAG_BUCKETS, registry=None)
    for lag in [*lags, 0.0]:
        expected.observe(lag)
    wanted = {s.name.replace("t_expected_lag_seconds", ""): s.value
              for s in next(iter(expected.collect())).samples if s.name.endswith(("_count", "_sum"))}
    got = {name: value for (name, labels), value in current().items()
           if ("destination", destination) in labels and name.startswith("trackrelay_delivery_")}
    buckets = {dict(labels)["le"]: value for (name, labels), value in current().items()
               if name == "trackrelay_delivery_lag_seconds_bucket" and ("destination", destination) in labels}
    observed = {s.labels["le"]: s.value for s in next(iter(expected.collect())).samples if s.name.endswith("_bucket")}
    assert buckets == observed and buckets["0.05"] == 3 and buckets["+Inf"] == 11
    assert got["trackrelay_delivery_lag_seconds_count"] == wanted["_count"] == 11
    assert got["trackrelay_delivery_lag_seconds_sum"] == pytest.approx(wanted["_sum"])
    attempts_by_outcome = {dict(labels)["outcome"]: value for (name, labels), value in current().items()
                           if name == "trackrelay_delivery_attempts_total" and ("destination", destination) in labels}
    assert attempts_by_outcome == {"delivered": 11, "retry": 1, "rejected": 1, "dead": 1}

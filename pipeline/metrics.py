"""Prometheus metrics shared by every trackrelay process: their definitions, and the
multiprocess folder they are written to.

prometheus-client decides how a metric keeps its value when the metric is built: it reads
``prometheus_client.values.ValueClass``, which that module sets once, at its import, from
``PROMETHEUS_MULTIPROC_DIR``. An environment variable set after anything imported
prometheus_client would be ignored, so :func:`use_folder` sets the variable (for the
children) *and* the value class itself, and the metrics are built lazily, by
:func:`process_metrics`, in the process that first records one (after the fork: each process
writes its own ``*_<pid>.db`` files, which the scraping process merges).

The folder is ``[admin] metrics_dir``, or, when that is empty, a private temporary folder
``run``/``serve`` make before forking and remove at exit. ``serve`` and ``worker`` on one
machine see each other's figures only through one shared ``metrics_dir``.

Processes that are gone: their counters and histograms are kept (a sum over every file that
ever was: a restart never makes a counter go back), their live gauges are removed
(``mark_process_dead``) when the folder is opened and closed.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import shutil
import tempfile
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

log = logging.getLogger("trackrelay.metrics")

FOLDER_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Request durations (seconds): a commit with fsync takes milliseconds; a stalled store 5-15 s.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_ROWS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Receive to delivered: a healthy pipeline is well under a second, a retried one minutes to hours.
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 10800.0)

# The label value for a message whose source is not known (no or a wrong write key).
NO_SOURCE = "none"


def multiprocess() -> bool:
    """Whether metrics built now write to a multiprocess folder."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def use_folder(path: str | None) -> None:
    """Have every metric built from now on (in this process and its children) write to
    ``path`` (None: keep them in this process). Metrics built before are dropped: they would
    go on writing where they were built."""
    process_metrics.cache_clear()
    values.close_all_multiprocess_files()
    if path is None:
        os.environ.pop(FOLDER_ENV, None)
        values.ValueClass = values.MutexValue
        return
    os.environ[FOLDER_ENV] = path
    values.ValueClass = values.MultiProcessValue()


def folder() -> str | None:
    """The multiprocess folder in use, None if metrics stay in this process."""
    return os.environ.get(FOLDER_ENV) if multiprocess() else None


def sweep_dead(path: str) -> int:
    """Remove the live gauges of processes that are gone; return how many pids were swept."""
    pids = set()
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        match = re.search(r"_(\d+)\.db$", name)
        if match and not _alive(int(match.group(1))):
            pids.add(int(match.group(1)))
    for pid in pids:
        mark_process_dead(pid, path)
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def metrics_folder(metrics_dir: str, private: bool = True) -> Iterator[str | None]:
    """The multiprocess folder for a command's processes, for as long as the command runs:
    ``metrics_dir`` (made if missing), else, if ``private``, a fresh temporary folder removed
    at exit; else (a ``worker`` alone without metrics_dir) none, the figures staying in memory."""
    if not metrics_dir and not private:
        yield None
        return
    path = metrics_dir or tempfile.mkdtemp(prefix="trackrelay-metrics-")
    os.makedirs(path, exist_ok=True)
    sweep_dead(path)
    previous = folder()
    use_folder(path)
    try:
        yield path
    finally:
        mark_process_dead(os.getpid(), path)
        sweep_dead(path)  # the children that served are gone by now
        use_folder(previous)  # nothing may write to a folder about to go
        if not metrics_dir:
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Metrics:
    """Every metric a trackrelay process records (the database gauges are computed at scrape
    time instead: receiver/admin/metrics.py)."""

    http_requests: Counter
    request_duration: Histogram
    requests_in_progress: Gauge
    commit_duration: Histogram
    commit_rows: Histogram
    messages: Counter
    rejected: Counter
    delivery_attempts: Counter
    delivery_lag: Histogram

    def all(self) -> tuple[Counter | Gauge | Histogram, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)


@functools.cache
def process_metrics() -> Metrics:
    """This process's metrics, built on first use (after the folder is chosen and after a fork)."""
    return Metrics(
        http_requests=Counter("trackrelay_http_requests_total", "Answers of the tracking API, by route name "
                              "and status", ["route", "status"], registry=None),
        request_duration=Histogram("trackrelay_request_duration_seconds", "Time from a request's headers to "
                                   "its answer", ["route"], buckets=DURATION_BUCKETS, registry=None),
        requests_in_progress=Gauge("trackrelay_requests_in_progress", "Requests being received or committed",
                                   registry=None, multiprocess_mode="livesum"),
        commit_duration=Histogram("trackrelay_commit_duration_seconds", "Time of one group commit",
                                  buckets=DURATION_BUCKETS, registry=None),
        commit_rows=Histogram("trackrelay_commit_rows", "Rows (outbox and rejected) in one group commit",
                              buckets=COMMIT_ROWS_BUCKETS, registry=None),
        messages=Counter("trackrelay_messages_total", "Messages accepted or rejected, by source",
                         ["source", "outcome"], registry=None),
        rejected=Counter("trackrelay_rejected_total", "Refusals (requests or batch items), by reason code",
                         ["reason"], registry=None),
        delivery_attempts=Counter("trackrelay_delivery_attempts_total", "Delivery attempts by destination and "
                                  "outcome (delivered, retry, rejected, dead)", ["destination", "outcome"],
                                  registry=None),
        delivery_lag=Histogram("trackrelay_delivery_lag_seconds", "Time from an event's receipt to its delivery",
                               ["destination"], buckets=LAG_BUCKETS, registry=None),
    )


def source_registry() -> CollectorRegistry:
    """A registry of what the processes recorded: every process's files in multiprocess mode,
    else this process's metrics."""
    registry = CollectorRegistry(auto_describe=True)
    path = folder()
    if path is not None:
        MultiProcessCollector(registry, path)
    else:
        for metric in process_metrics().all():
            registry.register(metric)
    return registry


def add_buckets(histogram: Histogram, counts: list[int], total: float) -> None:
    """Fold observations counted elsewhere into ``histogram`` (a child with its labels): what
    ``observe`` would have done for each, at one file write per bucket, not per observation.

    ``counts[i]`` is how many fell at or under the i-th bound (the last: +Inf), not cumulative,
    which is how prometheus-client keeps them (tests/test_metrics.py checks it still does)."""
    buckets = histogram._buckets  # noqa: SLF001 (prometheus-client has no batch observe)
    if len(buckets) != len(counts):
        raise ValueError(f"{len(counts)} counts for {len(buckets)} buckets")
    for bucket, count in zip(buckets, counts):
        if count:
            bucket.inc(count)
    histogram._sum.inc(total)  # noqa: SLF001


# -- what the worker records (a few calls per claimed batch or decoded group: not a hot path) --

def count_refused_items(codes: Iterable[str]) -> None:
    """Batch items the decoder refused (recorded in ``rejected`` as it stores their request):
    the receiver answered their request 200 or 207 for the others, and counted only those."""
    tally = Tally(codes)
    if not tally:
        return
    metrics = process_metrics()
    for code, count in tally.items():
        metrics.rejected.labels(code).inc(count)
    metrics.messages.labels(NO_SOURCE, "rejected").inc(sum(tally.values()))


def count_refused_request(code: str) -> None:
    """A stored request the decoder could not store and set aside (``decode_failed``)."""
    process_metrics().rejected.labels(code).inc()


def count_attempts(destination: str, attempts: Iterable[tuple[str, str, int]], now_ms: int) -> None:
    """One claimed batch's outcomes: (outcome kind, decided state, when the event was received,
    epoch ms: its receivedAt, as the events table keeps it)."""
    metrics = process_metrics()
    outcomes: dict[str, int] = {}
    # Folded, one increment per bucket: observe() per delivered event (two locked writes
    # each) was 8% of a fan-out worker's CPU (bench/fanout_drain.py, py-spy).
    lags, total = [0] * (len(LAG_BUCKETS) + 1), 0.0
    for kind, state, received_at_ms in attempts:
        outcome = attempt_outcome(kind, state)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "delivered":
            lag = max(0, now_ms - received_at_ms) / 1000
            lags[bisect_left(LAG_BUCKETS, lag)] += 1  # le is "<=": a lag on a bound is in its bucket
            total += lag
    for outcome, count in outcomes.items():
        metrics.delivery_attempts.labels(destination, outcome).inc(count)
    lag_histogram = metrics.delivery_lag.labels(destination)  # shown (at zero) before a first delivery
    if outcomes.get("delivered"):
        add_buckets(lag_histogram, lags, total)


def attempt_outcome(kind: str, state: str) -> str:
    """delivered; retry (pending again); rejected (the destination refused it: final); dead
    (given up: out of attempts or too old)."""
    if state == "delivered":
        return "delivered"
    if state == "pending":
        return "retry"
    return "rejected" if kind == "rejected" else "dead"

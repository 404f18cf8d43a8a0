"""pipeline.retry.BackoffPolicy: capped exponential backoff with full jitter, then dead (pure)."""

from __future__ import annotations

import random
from pathlib import Path

from pipeline.config import load_config
from pipeline.destinations.base import DELIVERED, rejected, retry
from pipeline.retry import DEAD, MAX_ERROR_CHARS, PENDING, BackoffPolicy, Decision

NOW = 1_800_000_000_000
POLICY = BackoffPolicy(max_attempts=10, initial_seconds=1.0, max_seconds=300.0, max_age_seconds=10800.0)


def test_delivered_is_delivered() -> None:
    assert POLICY.decide(DELIVERED, 1, NOW, NOW) == Decision("delivered")


def test_rejected_is_dead_at_once_with_its_reason() -> None:
    assert POLICY.decide(rejected("HTTP 400: bad event"), 1, NOW, NOW) == Decision(
        DEAD, error="rejected: HTTP 400: bad event")


def test_retry_waits_a_jittered_delay_within_the_capped_exponential_ceiling() -> None:
    rng = random.Random(1234)
    for attempts in range(1, 10):
        ceiling_ms = min(300.0, 1.0 * 2 ** (attempts - 1)) * 1000
        for _ in range(200):
            decision = POLICY.decide(retry("HTTP 503"), attempts, NOW, NOW, rng)
            assert decision.state == PENDING
            assert decision.error == "HTTP 503"
            assert decision.next_attempt_at_ms is not None
            assert 0 <= decision.next_attempt_at_ms - NOW <= ceiling_ms, (attempts, decision)


def test_the_ceiling_stops_at_retry_max_seconds() -> None:
    rng = random.Random(7)
    waits = [POLICY.decide(retry("down"), 9, NOW, NOW, rng).next_attempt_at_ms - NOW for _ in range(2000)]

    # 2 ** 8 = 256 s is under the 300 s cap at attempt 9; with max 60 s the cap decides.
    capped = BackoffPolicy(max_attempts=20, initial_seconds=1.0, max_seconds=60.0)
    capped_waits = [capped.decide(retry("down"), 15, NOW, NOW, rng).next_attempt_at_ms - NOW for _ in range(2000)]

    assert max(waits) > 200_000
    assert max(capped_waits) <= 60_000
    assert max(capped_waits) > 55_000


def test_full_jitter_spreads_delays_over_the_whole_range() -> None:
    rng = random.Random(99)
    waits = [POLICY.decide(retry("down"), 5, NOW, NOW, rng).next_attempt_at_ms - NOW for _ in range(1000)]

    # Ceiling 16 s: full jitter, not "ceiling plus a little".
    assert min(waits) < 1_600
    assert max(waits) > 14_400
    assert len(set(waits)) > 900
    assert sum(w < 8_000 for w in waits) in range(400, 601)


def test_a_seeded_random_gives_the_same_delays() -> None:
    first = [POLICY.delay(3, random.Random(5)) for _ in range(3)]

    assert first == [POLICY.delay(3, random.Random(5))] * 3


def test_retry_after_is_honoured_exactly() -> None:
    assert POLICY.decide(retry("HTTP 429", 7.0), 1, NOW, NOW) == Decision(PENDING, NOW + 7000, "HTTP 429")
    assert POLICY.decide(retry("HTTP 503", 0.0), 4, NOW, NOW) == Decision(PENDING, NOW, "HTTP 503")


def test_out_of_attempts_is_dead_with_the_last_error() -> None:
    assert POLICY.decide(retry("HTTP 503: busy"), 9, NOW, NOW, random.Random(1)).state == PENDING
    assert POLICY.decide(retry("HTTP 503: busy"), 10, NOW, NOW) == Decision(
        DEAD, error="gave up after 10 attempts: HTTP 503: busy")


def test_a_retry_that_would_fall_past_max_age_is_dead() -> None:
    created = NOW - 10800_000 + 5_000

    assert POLICY.decide(retry("timeout", 4.0), 3, created, NOW) == Decision(PENDING, NOW + 4000, "timeout")
    assert POLICY.decide(retry("timeout", 6.0), 3, created, NOW) == Decision(
        DEAD, error="too old to retry after 3 attempts: timeout")
    assert POLICY.decide(retry("timeout"), 3, NOW - 10801_000, NOW, random.Random(1)).state == DEAD


def test_an_empty_reason_records_the_outcome_kind() -> None:
    assert POLICY.decide(retry(""), 1, NOW, NOW, random.Random(1)).error == "retry"


def test_fractional_seconds_work() -> None:
    fast = BackoffPolicy(max_attempts=5, initial_seconds=0.05, max_seconds=0.2, max_age_seconds=0.5)
    rng = random.Random(3)

    first = [fast.decide(retry("x"), 1, NOW, NOW, rng).next_attempt_at_ms - NOW for _ in range(500)]
    later = [fast.decide(retry("x"), 4, NOW, NOW, rng).next_attempt_at_ms - NOW for _ in range(500)]

    assert 0 <= min(first) and max(first) <= 50 and max(first) >= 45
    assert max(later) <= 200 and max(later) >= 180
    assert fast.decide(retry("x", 0.05), 1, NOW, NOW) == Decision(PENDING, NOW + 50, "x")
    assert fast.decide(retry("x", 0.05), 1, NOW - 460, NOW).state == DEAD


def test_fractional_settings_from_the_config_file_reach_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "trackrelay.toml"
    path.write_text('[[destinations]]\nname = "hook"\ntype = "log"\nmax_attempts = 3\n'
                    'retry_initial_seconds = 0.05\nretry_max_seconds = 0.25\nmax_age_seconds = 1.5\n')

    (dest,) = load_config(path, env={}).destinations

    assert BackoffPolicy.for_destination(dest) == BackoffPolicy(3, 0.05, 0.25, 1.5)


def test_the_last_error_is_truncated() -> None:
    huge = "x" * 10_000

    decisions = [POLICY.decide(retry(huge), 1, NOW, NOW, random.Random(1)),
                 POLICY.decide(retry(huge), 10, NOW, NOW),
                 POLICY.decide(rejected(huge), 1, NOW, NOW),
                 POLICY.decide(retry(huge, 10_000_000.0), 1, NOW, NOW)]

    assert [d.state for d in decisions] == [PENDING, DEAD, DEAD, DEAD]
    assert all(d.error is not None and len(d.error) <= MAX_ERROR_CHARS for d in decisions)
    assert decisions[0].error == "x" * MAX_ERROR_CHARS
    assert decisions[2].error == ("rejected: " + huge)[:MAX_ERROR_CHARS]


def test_a_huge_attempt_count_does_not_overflow_the_backoff() -> None:
    policy = BackoffPolicy(max_attempts=100_000, initial_seconds=1.0, max_seconds=60.0, max_age_seconds=1e9)
    decision = policy.decide(retry("HTTP 503"), 1100, created_at_ms=0, now_ms=1_000, rng=random.Random(1))
    assert decision.state == PENDING
    assert 1_000 <= decision.next_attempt_at_ms <= 61_000

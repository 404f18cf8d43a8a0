"""The pure parts of browser safety: origin patterns, the token buckets (on a clock the test
moves), and the CORS decisions of receiver/cors.py."""

from __future__ import annotations

import pytest

from pipeline.config import Config, ReceiverConfig, SourceConfig
from pipeline.origins import parse_origin, parse_pattern
from receiver.cors import CorsPolicy, allowed_request_headers
from receiver.ratelimit import MAX_CLIENT_BUCKETS, RateLimiter, TokenBucket


@pytest.mark.parametrize(("pattern", "origin", "expected"), [
    ("https://shop.example", "https://shop.example", True),
    ("https://shop.example", "https://SHOP.example", True),
    ("https://shop.example", "https://shop.example:443", True),
    ("https://shop.example:443", "https://shop.example", True),
    ("https://shop.example", "http://shop.example", False),
    ("https://shop.example", "https://shop.example:8443", False),
    ("https://shop.example", "https://shop.example.evil", False),
    ("https://shop.example", "https://a.shop.example", False),
    ("https://*.shop.example", "https://a.shop.example", True),
    ("https://*.shop.example", "https://a.b.shop.example", True),
    ("https://*.shop.example", "https://shop.example", False),
    ("https://*.shop.example", "https://evilshop.example", False),
    ("https://*.shop.example", "https://a.shop.example.evil", False),
    ("https://*.shop.example", "http://a.shop.example", False),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000", True),
    ("http://127.0.0.1:8000", "http://127.0.0.1:8001", False),
    ("http://[::1]:8000", "http://[::1]:8000", True),
    ("http://[0:0:0:0:0:0:0:1]:8000", "http://[::1]:8000", True),
    ("http://[::1]:8000", "http://[0::1]:8000", True),
    ("null", "null", True),
    ("http://null", "null", False),
    ("https://shop.example", "null", False),
    ("https://shop.example", "https://shop.example/", False),
    ("https://shop.example", "https://*.example", False),
])
def test_origin_patterns(pattern: str, origin: str, expected: bool) -> None:
    assert parse_pattern(pattern).matches(origin) is expected


@pytest.mark.parametrize("text", ["shop.example", "https://shop.example/", "https://a.example/x", "*",
                                  "https://*", "https://sh*p.example", "https://x.example:0", "https://a b",
                                  "https://*.com", "https://*.0.0.1", "https://*.[::1]", "http://[zz::1]"])
def test_patterns_that_are_not_origins_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_pattern(text)


def test_parse_origin_drops_the_default_port() -> None:
    assert parse_origin("https://a.example:443") == ("https", "a.example", "")
    assert parse_origin("http://a.example:443") == ("http", "a.example", "443")
    assert parse_origin("x" * 400) is None


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2, burst=3, now=0.0)
    for _ in range(3):
        assert bucket.wait(0.0) == 0.0
        bucket.take()
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert bucket.wait(0.25) == pytest.approx(0.25)
    assert bucket.wait(0.5) == 0.0
    assert bucket.wait(100.0) == 0.0 and bucket.tokens == 3  # never more than the burst


def test_the_default_burst_is_the_rate_rounded_up_and_at_least_one() -> None:
    assert TokenBucket(rate=0.2, burst=0, now=0).burst == 1
    assert TokenBucket(rate=7.5, burst=0, now=0).burst == 8


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_refused_request_takes_no_token_from_any_bucket() -> None:
    clock = Clock()
    web = SourceConfig("web", ("k",), rate_limit_per_second=1, rate_limit_burst=10,
                       client_rate_limit_per_second=1, client_rate_limit_burst=1)
    limiter = RateLimiter([web], clock=clock)
    assert limiter.admit(["web"], "a") == 0.0
    assert limiter.admit(["web"], "a") == pytest.approx(1.0)  # a's bucket is empty
    assert limiter.limits["web"].whole is not None and limiter.limits["web"].whole.tokens == 9
    assert limiter.admit(["web"], "b") == 0.0
    clock.now = 1.0
    assert limiter.admit(["web"], "a") == 0.0


def test_client_buckets_are_bounded() -> None:
    limiter = RateLimiter([SourceConfig("web", ("k",), client_rate_limit_per_second=1)], clock=Clock())
    for i in range(MAX_CLIENT_BUCKETS + 10):
        limiter.admit(["web"], str(i))
    assert len(limiter.limits["web"].clients) == MAX_CLIENT_BUCKETS
    assert "0" not in limiter.limits["web"].clients and str(MAX_CLIENT_BUCKETS + 9) in limiter.limits["web"].clients


def test_unlimited_sources_are_not_tracked() -> None:
    limiter = RateLimiter([SourceConfig("web", ("k",))])
    assert not limiter.enabled and limiter.admit(["web"], "a") == 0.0


@pytest.mark.parametrize(("requested", "allowed"), [
    ("content-type", "content-type"),
    ("Content-Type,Authorization", "Content-Type, Authorization"),
    ("a , b\t,c", "a, b, c"),
    ("x-", "x-"),
    (None, None), ("", None), (" ", None), ("a,", None), (",a", None), ("a b", None), ("a:b", None),
    ("a\r\nb", None), ("é", None),
])
def test_requested_headers_are_echoed_only_when_valid(requested: str | None, allowed: str | None) -> None:
    assert allowed_request_headers(requested) == allowed


def policy(*sources: SourceConfig, cors_origins: tuple[str, ...] = ()) -> CorsPolicy:
    return CorsPolicy(Config(receiver=ReceiverConfig(cors_origins=cors_origins), sources=sources))


def test_the_global_list_decides_over_the_sources() -> None:
    cors = policy(SourceConfig("web", ("k",), allowed_origins=(parse_pattern("https://b.example"),)),
                  cors_origins=("https://a.example",))
    assert cors.allows("https://a.example", ["web"]) and not cors.allows("https://b.example", ["web"])


def test_unknown_sources_follow_the_union_unless_a_source_takes_every_origin() -> None:
    listed = SourceConfig("web", ("k",), allowed_origins=(parse_pattern("https://b.example"),))
    assert not policy(listed).allows("https://c.example")
    assert policy(listed, SourceConfig("server", ("s",))).allows("https://c.example")
    assert not policy(listed, SourceConfig("server", ("s",))).allows("https://c.example", ["web"])


def test_ipv6_clients_share_a_bucket_per_64() -> None:
    from receiver.ratelimit import client_key

    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff:1:2:3") == "2001:db8:1:2::"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("198.51.100.7") == "198.51.100.7" and client_key("not:an:address:x") == "not:an:address:x"


def test_retry_after_is_capped() -> None:
    from receiver.guard import MAX_RETRY_AFTER, BrowserGuard

    web = SourceConfig("web", ("k",), rate_limit_per_second=1e-6, rate_limit_burst=1)  # below what config takes
    config = Config(sources=(web,))
    guard = BrowserGuard(config, CorsPolicy(config))
    assert guard.check(None, ["web"], "a", "track") is None
    refusal = guard.check(None, ["web"], "a", "track")
    assert refusal is not None and refusal.retry_after == MAX_RETRY_AFTER

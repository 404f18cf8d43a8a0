"""What the browser SDKs load before they send, over real HTTP: analytics-next's settings,
RudderStack's source config, the first-party analytics.js bundle and its chunks."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import RunningReceiver
from receiver.bundle import CDN_PROLOGUE

SOURCES = {"website": ["WEBKEY"]}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


# -- analytics-next's settings ------------------------------------------------------------------

def test_settings_point_analytics_next_back_at_the_request_host(receiver: RunningReceiver) -> None:
    response = receiver.get("/v1/projects/anykey/settings", headers={"Origin": "https://shop.example"})
    assert response.status_code == 200
    settings = response.json()
    host = f"127.0.0.1:{receiver.port}"
    segment = settings["integrations"]["Segment.io"]
    assert (segment["apiKey"], segment["apiHost"], segment["protocol"]) == ("anykey", f"{host}/v1", "http")
    assert list(settings["integrations"]) == ["Segment.io"]  # no device-mode destinations to load
    assert settings["metrics"]["sampleRate"] == 0  # nothing goes to Segment's own metrics
    assert settings["plan"]["track"]["__default"]["enabled"] is True
    assert settings["edgeFunction"] == {} and settings["remotePlugins"] == []
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["content-type"].startswith("application/json")


def test_settings_path_takes_a_trailing_slash_and_an_escaped_key(receiver: RunningReceiver) -> None:
    response = receiver.get("/v1/projects/a%20key/settings/")
    assert response.json()["integrations"]["Segment.io"]["apiKey"] == "a key"


def test_settings_use_public_url_when_set(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(public_url="https://track.shop.example/collect/")
    segment = receiver.get("/v1/projects/k/settings").json()["integrations"]["Segment.io"]
    assert (segment["apiHost"], segment["protocol"]) == ("track.shop.example/collect/v1", "https")


@pytest.mark.parametrize(("trust", "expected"), [(True, ("proxy.example:8443/v1", "https")),
                                                  (False, (None, "http"))])
def test_forwarded_host_and_proto_only_when_trusted(start_receiver: Callable[..., RunningReceiver],
                                                    trust: bool, expected: tuple[str | None, str]) -> None:
    receiver = start_receiver(trust_forwarded_headers=trust)
    response = receiver.get("/v1/projects/k/settings", headers={
        "X-Forwarded-Host": "proxy.example:8443", "X-Forwarded-Proto": "https"})
    segment = response.json()["integrations"]["Segment.io"]
    assert (segment["apiHost"], segment["protocol"]) == (expected[0] or f"127.0.0.1:{receiver.port}/v1", expected[1])


@pytest.mark.parametrize("host", ['evil.example"/><script>', "a b", "x:y:z/", "a..b", ""])
def test_a_forwarded_host_that_is_not_a_host_gets_400(start_receiver: Callable[..., RunningReceiver],
                                                      host: str) -> None:
    # Tornado refuses such a Host header itself; X-Forwarded-Host is ours to check before it is
    # written into settings and scripts.
    receiver = start_receiver(trust_forwarded_headers=True)
    response = receiver.get("/v1/projects/k/settings", headers={"X-Forwarded-Host": host})
    assert (response.status_code, response.json()["code"]) == (400, "invalid_host")


def test_closed_mode_answers_404_for_an_unknown_key(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(sources=SOURCES)
    response = receiver.get("/v1/projects/NOPE/settings")
    assert (response.status_code, response.json()["code"]) == (404, "not_found")
    assert "NOPE" not in response.text
    assert response.headers["access-control-allow-origin"] == "*"
    assert receiver.get("/v1/projects/WEBKEY/settings").json()["integrations"]["Segment.io"]["apiKey"] == "WEBKEY"


# -- RudderStack's source config ----------------------------------------------------------------

RUDDER_QUERY = "p=npm&v=3.34.1&build=modern&writeKey={key}&lockIntegrationsVersion=true&lockPluginsVersion=true"


@pytest.mark.parametrize("path", ["/sourceConfig/", "/sourceConfig"])
def test_source_config_for_rudderstack(start_receiver: Callable[..., RunningReceiver], path: str) -> None:
    receiver = start_receiver(sources=SOURCES)
    response = receiver.get(f"{path}?{RUDDER_QUERY.format(key='WEBKEY')}", headers=basic("WEBKEY"))
    assert response.status_code == 200
    config = response.json()
    source = config["source"]
    assert (source["id"], source["name"], source["enabled"], source["destinations"]) == ("website", "website",
                                                                                         True, [])
    assert source["config"]["statsCollection"] == {"errors": {"enabled": False}, "metrics": {"enabled": False}}
    assert response.headers["cache-control"] == "public, max-age=300"


def test_source_config_takes_the_key_from_basic_auth(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(sources=SOURCES)
    response = receiver.get("/sourceConfig/", headers=basic("WEBKEY"))
    assert response.json()["source"]["id"] == "website"
    assert "WEBKEY" not in response.text  # the SDK does not read it back: not answered


@pytest.mark.parametrize("query", ["?writeKey=NOPE", "", "?writeKey=", "?writeKey=%ff", "?writeKey=WEBKEY%00"])
def test_source_config_unknown_key_is_404(start_receiver: Callable[..., RunningReceiver], query: str) -> None:
    receiver = start_receiver(sources=SOURCES)
    response = receiver.get(f"/sourceConfig/{query}")
    assert (response.status_code, response.json()["code"]) == (404, "not_found")


def test_source_config_head_for_ad_blocker_detection(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(sources=SOURCES)
    response = receiver.client.head("/sourceConfig/?view=ad", headers=basic("WEBKEY"))
    assert (response.status_code, response.content) == (200, b"")
    assert receiver.client.head("/sourceConfig/?writeKey=NOPE").status_code == 404


def test_source_config_preflight_echoes_the_requested_headers(receiver: RunningReceiver) -> None:
    response = receiver.client.options("/sourceConfig/?writeKey=k", headers={
        "Origin": "https://shop.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert response.status_code == 204
    assert response.headers["access-control-allow-headers"] == "authorization"
    assert response.headers["access-control-allow-origin"] == "*"


# -- the first-party bundle ---------------------------------------------------------------------

STANDALONE = b"/* analytics-next standalone */ console.log('standalone');\n"
CHUNK = "auto-track.bundle.f131ce01a05e3a33a8c1.js"


@pytest.fixture
def sdk_dir(tmp_path: Path) -> Path:
    """A folder shaped like analytics-next's dist/umd (stand-in files: their bytes, not their
    JavaScript, are what these tests check; the browser tests load the real bundle)."""
    folder = tmp_path / "sdk"
    folder.mkdir()
    (folder / "standalone.js").write_bytes(STANDALONE)
    (folder / CHUNK).write_bytes(b"chunk();\n")
    (folder / "secret.txt").write_text("not served")
    return folder


@pytest.fixture
def bundled(start_receiver: Callable[..., RunningReceiver], sdk_dir: Path) -> RunningReceiver:
    return start_receiver(sources=SOURCES, browser_sdk_dir=str(sdk_dir))


def test_bundle_is_served_at_segments_path_with_the_cdn_set(bundled: RunningReceiver) -> None:
    response = bundled.get("/analytics.js/v1/WEBKEY/analytics.min.js", headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.content.endswith(STANDALONE)
    prologue = response.content[:-len(STANDALONE)]
    assert prologue == CDN_PROLOGUE  # the CDN is worked out in the browser, from the script's own src
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.headers["etag"].startswith('"')


def test_bundle_etag_answers_304_and_changes_with_the_file(bundled: RunningReceiver, sdk_dir: Path) -> None:
    path = "/analytics.js/v1/WEBKEY/analytics.min.js"
    etag = bundled.get(path).headers["etag"]
    response = bundled.get(path, headers={"If-None-Match": etag})
    assert (response.status_code, response.content) == (304, b"")
    (sdk_dir / "standalone.js").write_bytes(STANDALONE + b"// v2\n")
    response = bundled.get(path, headers={"If-None-Match": etag})
    assert response.status_code == 200 and response.headers["etag"] != etag
    assert response.content.endswith(b"// v2\n")


def test_bundle_is_gzipped_when_asked(bundled: RunningReceiver) -> None:
    response = bundled.client.get("/analytics.js/v1/WEBKEY/analytics.min.js", headers={"Accept-Encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip" and "Accept-Encoding" in response.headers["vary"]
    assert response.content.endswith(STANDALONE)  # httpx inflated it


def test_chunks_are_served_immutable_and_nothing_else(bundled: RunningReceiver) -> None:
    response = bundled.get(f"/analytics-next/bundles/{CHUNK}")
    assert (response.status_code, response.content) == (200, b"chunk();\n")
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    for name in ("secret.txt", "..%2Fsecret.txt", "missing.bundle.js", "standalone.js"):
        response = bundled.get(f"/analytics-next/bundles/{name}")
        assert response.status_code == 404, name


def test_bundle_for_an_unknown_key_is_404(bundled: RunningReceiver) -> None:
    response = bundled.get("/analytics.js/v1/NOPE/analytics.min.js")
    assert (response.status_code, response.json()["code"]) == (404, "not_found")


def test_bundle_not_configured_says_how(receiver: RunningReceiver) -> None:
    response = receiver.get("/analytics.js/v1/k/analytics.min.js")
    assert response.status_code == 404 and "browser_sdk_dir" in response.json()["Details"]


def test_bundle_is_the_same_whatever_host_the_request_names(bundled: RunningReceiver) -> None:
    path = "/analytics.js/v1/WEBKEY/analytics.min.js"
    answers = [bundled.get(path, headers={"Host": host}) for host in ("a.example", "b.example:81", "evil.example")]
    assert len({a.content for a in answers}) == 1 and len({a.headers["etag"] for a in answers}) == 1
    assert b"evil.example" not in answers[-1].content


def test_bundle_and_chunks_are_public_scripts_without_vary_origin(
        start_receiver: Callable[..., RunningReceiver], sdk_dir: Path) -> None:
    receiver = start_receiver(sources=SOURCES, browser_sdk_dir=str(sdk_dir), cors_origins=("https://shop.example",))
    for path in ("/analytics.js/v1/WEBKEY/analytics.min.js", f"/analytics-next/bundles/{CHUNK}"):
        response = receiver.get(path, headers={"Origin": "https://elsewhere.example"})
        assert response.headers["access-control-allow-origin"] == "*"
        assert "Origin" not in response.headers.get("vary", "")


def test_head_on_the_bundle_and_a_chunk(bundled: RunningReceiver) -> None:
    for path in ("/analytics.js/v1/WEBKEY/analytics.min.js", f"/analytics-next/bundles/{CHUNK}"):
        response = bundled.client.head(path)
        assert (response.status_code, response.content) == (200, b"") and response.headers["etag"]


@pytest.mark.parametrize(("if_none_match", "status"), [("W/{etag}", 304), ("*", 304), ('"other", {etag}', 304),
                                                       ('"other"', 200)])
def test_bundle_etag_is_compared_weakly(bundled: RunningReceiver, if_none_match: str, status: int) -> None:
    path = "/analytics.js/v1/WEBKEY/analytics.min.js"
    etag = bundled.get(path).headers["etag"]
    assert bundled.get(path, headers={"If-None-Match": if_none_match.format(etag=etag)}).status_code == status


@pytest.mark.parametrize(("accept", "gzipped"), [("gzip", True), ("br, gzip;q=0.5", True), ("gzip;q=0", False),
                                                 ("identity", False), ("GZIP", True)])
def test_bundle_gzip_follows_accept_encoding(bundled: RunningReceiver, accept: str, gzipped: bool) -> None:
    response = bundled.get("/analytics.js/v1/WEBKEY/analytics.min.js", headers={"Accept-Encoding": accept})
    assert (response.headers.get("content-encoding") == "gzip") is gzipped


@pytest.mark.parametrize("path", ["/v1/projects/WEBKEY", "/v1/projects/WEBKEY/settings/x",
                                  "/analytics.js/v1/WEBKEY/analytics.js"])
def test_a_path_near_a_key_route_does_not_echo_the_key(bundled: RunningReceiver, path: str) -> None:
    response = bundled.get(path)
    assert response.status_code == 404 and "WEBKEY" not in response.text
    assert "<writeKey>" in response.json()["Details"]


def test_a_missing_bundle_file_does_not_echo_the_key(bundled: RunningReceiver, sdk_dir: Path) -> None:
    (sdk_dir / "standalone.js").unlink()
    response = bundled.get("/analytics.js/v1/WEBKEY/analytics.min.js")
    assert response.status_code == 404 and "WEBKEY" not in response.text


def test_settings_vary_with_the_host_unless_public_url_is_set(start_receiver: Callable[..., RunningReceiver]) -> None:
    assert start_receiver().get("/v1/projects/k/settings").headers["vary"] == "Host"
    trusting = start_receiver(trust_forwarded_headers=True)
    assert trusting.get("/v1/projects/k/settings").headers["vary"] == "Host, X-Forwarded-Host, X-Forwarded-Proto"
    assert "vary" not in start_receiver(public_url="https://t.example").get("/v1/projects/k/settings").headers


def test_the_last_forwarded_host_is_the_proxys(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(trust_forwarded_headers=True)
    response = receiver.get("/v1/projects/k/settings", headers={"X-Forwarded-Host": "evil.example, track.shop.example"})
    assert response.json()["integrations"]["Segment.io"]["apiHost"] == "track.shop.example/v1"


def test_settings_follow_their_sources_allowed_origins(start_receiver: Callable[..., RunningReceiver]) -> None:
    receiver = start_receiver(cors_origins=("https://shop.example",))
    listed = receiver.get("/v1/projects/k/settings", headers={"Origin": "https://shop.example"})
    other = receiver.get("/v1/projects/k/settings", headers={"Origin": "https://evil.example"})
    assert listed.headers["access-control-allow-origin"] == "https://shop.example"
    assert "access-control-allow-origin" not in other.headers and "Origin" in other.headers["vary"]

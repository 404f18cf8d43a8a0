"""pipeline.config.load_config: defaults, file, environment, flags, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (SECTIONS, Config, ConfigError, DatabaseConfig, ReceiverConfig, SourceConfig,
                             env_name, load_config, settings_help)

FULL_FILE = """
log_level = "debug"

[database]
url = "postgresql://u@db/trackrelay"
sqlite_synchronous = "normal"
lock_timeout_seconds = 2.5

[receiver]
host = "0.0.0.0"
port = 9000
max_call_bytes = 1000
max_batch_bytes = 50000
cors_origins = ["https://a.example", "https://b.example"]
partial_success_status = 200
trust_forwarded_headers = true

[[sources]]
name = "website"
write_keys = ["ILoveData123", "second"]

[[sources]]
name = "app"
write_keys = ["appkey"]
"""


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trackrelay.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str | None = None, env: dict[str, str] | None = None,
         **overrides: Any) -> Config:
    path = config_file(tmp_path, text) if text is not None else None
    return load_config(path, env=env or {}, overrides=overrides)


def error_of(tmp_path: Path, text: str | None = None, env: dict[str, str] | None = None,
             **overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, env, **overrides)
    return str(caught.value)


def test_defaults_without_file_or_environment(tmp_path: Path) -> None:
    config = load(tmp_path)

    assert config == Config(database=DatabaseConfig(), receiver=ReceiverConfig(), sources=(), log_level="INFO")
    assert config.database.url == "sqlite:///trackrelay.db"
    assert config.database.sqlite_synchronous == "FULL"
    assert (config.receiver.host, config.receiver.port) == ("127.0.0.1", 8088)
    assert (config.receiver.max_call_bytes, config.receiver.max_batch_bytes) == (15360, 512000)
    assert config.receiver.partial_success_status == 207
    assert config.open_mode is True


def test_values_from_the_file(tmp_path: Path) -> None:
    config = load(tmp_path, FULL_FILE)

    assert config.database == DatabaseConfig(url="postgresql://u@db/trackrelay", sqlite_synchronous="NORMAL",
                                             lock_timeout_seconds=2.5)
    assert config.receiver == ReceiverConfig(
        host="0.0.0.0", port=9000, max_call_bytes=1000, max_batch_bytes=50000,
        cors_origins=("https://a.example", "https://b.example"), partial_success_status=200,
        trust_forwarded_headers=True)
    assert config.sources == (
        SourceConfig(name="website", write_keys=("ILoveData123", "second")),
        SourceConfig(name="app", write_keys=("appkey",)),
    )
    assert config.log_level == "DEBUG"
    assert config.open_mode is False


def test_the_file_is_named_by_trackrelay_config(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[receiver]\nport = 9100\n")

    assert load_config(env={"TRACKRELAY_CONFIG": str(path)}).receiver.port == 9100


def test_the_environment_beats_the_file(tmp_path: Path) -> None:
    env = {"TRACKRELAY_RECEIVER_PORT": "9200", "TRACKRELAY_DATABASE_URL": "sqlite:///env.db",
           "TRACKRELAY_LOG_LEVEL": "warning"}

    config = load(tmp_path, FULL_FILE, env)

    assert (config.receiver.port, config.database.url, config.log_level) == (9200, "sqlite:///env.db", "WARNING")
    assert config.receiver.host == "0.0.0.0"  # not in the environment: still the file's


def test_flags_beat_the_environment(tmp_path: Path) -> None:
    env = {"TRACKRELAY_RECEIVER_PORT": "9200", "TRACKRELAY_DATABASE_URL": "sqlite:///env.db",
           "TRACKRELAY_LOG_LEVEL": "WARNING"}

    config = load(tmp_path, FULL_FILE, env, receiver={"port": 9300, "host": None},
                  database={"url": "sqlite:///flag.db"}, **{"": {"log_level": "ERROR"}})

    assert (config.receiver.port, config.database.url, config.log_level) == (9300, "sqlite:///flag.db", "ERROR")
    assert config.receiver.host == "0.0.0.0"  # a flag left unset (None) does not count


def test_lists_from_the_environment_are_comma_separated(tmp_path: Path) -> None:
    env = {"TRACKRELAY_RECEIVER_CORS_ORIGINS": "https://a.example, https://b.example,,"}

    assert load(tmp_path, env=env).receiver.cors_origins == ("https://a.example", "https://b.example")


@pytest.mark.parametrize("raw,value", [("1", True), ("true", True), ("YES", True), ("on", True),
                                       ("0", False), ("false", False), ("No", False), ("off", False)])
def test_bools_from_the_environment(tmp_path: Path, raw: str, value: bool) -> None:
    config = load(tmp_path, env={"TRACKRELAY_RECEIVER_TRUST_FORWARDED_HEADERS": raw})

    assert config.receiver.trust_forwarded_headers is value


def test_numbers_from_the_environment(tmp_path: Path) -> None:
    config = load(tmp_path, env={"TRACKRELAY_DATABASE_LOCK_TIMEOUT_SECONDS": "0.5",
                                 "TRACKRELAY_RECEIVER_MAX_CALL_BYTES": "2048"})

    assert (config.database.lock_timeout_seconds, config.receiver.max_call_bytes) == (0.5, 2048)


ERRORS = {
    "string_port": ('[receiver]\nport = "x"\n', None, "[receiver] port: expected an integer, got 'x'"),
    "float_port": ("[receiver]\nport = 80.5\n", None, "[receiver] port: expected an integer, got 80.5"),
    "bool_port": ("[receiver]\nport = true\n", None, "[receiver] port: expected a number, got True"),
    "env_port": (None, {"TRACKRELAY_RECEIVER_PORT": "eighty"},
                 "TRACKRELAY_RECEIVER_PORT: expected an integer, got 'eighty'"),
    "string_bool": ('[receiver]\ntrust_forwarded_headers = "yes"\n', None,
                    "[receiver] trust_forwarded_headers: expected true or false, got 'yes'"),
    "env_bool": (None, {"TRACKRELAY_RECEIVER_TRUST_FORWARDED_HEADERS": "maybe"},
                 "TRACKRELAY_RECEIVER_TRUST_FORWARDED_HEADERS: expected true or false, got 'maybe'"),
    "string_list": ('[receiver]\ncors_origins = "https://a.example"\n', None,
                    "[receiver] cors_origins: expected a list of strings, got str"),
    "url_number": ("[database]\nurl = 5\n", None, "[database] url: expected a string, got int"),
    "negative": ("[receiver]\nmax_batch_bytes = -1\n", None, "[receiver] max_batch_bytes: must not be negative"),
    "env_negative": (None, {"TRACKRELAY_DATABASE_LOCK_TIMEOUT_SECONDS": "-2"},
                     "TRACKRELAY_DATABASE_LOCK_TIMEOUT_SECONDS: must not be negative"),
    "zero_limit": ("[receiver]\nmax_call_bytes = 0\n", None, "[receiver] max_call_bytes: must be at least 1"),
    "zero_processes": ("[receiver]\nprocesses = 0\n", None, "[receiver] processes: must be at least 1"),
    "short_lease": ("[worker]\nlease_seconds = 0.5\n", None, "[worker] lease_seconds: must be at least 1"),
    "nan_gather": ("[receiver]\ncommit_gather_ms = nan\n", None, "[receiver] commit_gather_ms: expected a number, got nan"),
    "env_nan": (None, {"TRACKRELAY_DATABASE_LOCK_TIMEOUT_SECONDS": "nan"},
                "TRACKRELAY_DATABASE_LOCK_TIMEOUT_SECONDS: expected a number, got 'nan'"),
    "infinite_float": ("[worker]\nlease_seconds = inf\n", None, "[worker] lease_seconds: expected a number, got inf"),
    "infinite_int": ("[receiver]\nport = inf\n", None, "[receiver] port: expected an integer, got inf"),
    # An integer too big for a float must not reach math.isfinite (it raised OverflowError).
    "env_huge_port": (None, {"TRACKRELAY_RECEIVER_PORT": "9" * 400}, "[receiver] port: must be at most 65535"),
    "long_gather": ("[receiver]\ncommit_gather_ms = 1500\n", None, "[receiver] commit_gather_ms: must be at most 1000"),
    "negative_gather": (None, {"TRACKRELAY_RECEIVER_COMMIT_GATHER_MS": "-1"},
                        "TRACKRELAY_RECEIVER_COMMIT_GATHER_MS: must not be negative"),
    "unknown_key": ("[receiver]\nprot = 8000\n", None, "[receiver] prot: unknown key"),
    "unknown_section": ("[reciever]\nport = 8000\n", None, "reciever: unknown section"),
    "section_not_a_table": ('receiver = "x"\n', None, "[receiver]: expected a table"),
    "partial_status": ("[receiver]\npartial_success_status = 202\n", None,
                       "[receiver] partial_success_status: must be one of [200, 207], got 202"),
    "synchronous": ('[database]\nsqlite_synchronous = "sometimes"\n', None,
                    "[database] sqlite_synchronous: must be one of"),
    "log_level": ('log_level = "loud"\n', None, "log_level: must be DEBUG, INFO, WARNING or ERROR"),
    "invalid_toml": ("[receiver\nport = 1\n", None, "invalid TOML"),
    "source_without_name": ('[[sources]]\nwrite_keys = ["k"]\n', None, "[[sources]] #1 name: required"),
    "source_without_keys": ('[[sources]]\nname = "web"\n', None,
                            "[[sources]] #1 write_keys: at least one non-empty key is required"),
    "source_unknown_key": ('[[sources]]\nname = "web"\nwrite_keys = ["k"]\nwritekeys = ["k"]\n', None,
                           "[[sources]] #1 writekeys: unknown key"),
    "bad_origin": ('[[sources]]\nname = "web"\nwrite_keys = ["k"]\nallowed_origins = ["https://a.example/path"]\n',
                   None, "[[sources]] web allowed_origins: 'https://a.example/path' is not an origin"),
    "origin_port": ('[[sources]]\nname = "web"\nwrite_keys = ["k"]\nallowed_origins = ["http://a:99999"]\n',
                    None, "[[sources]] web allowed_origins: 'http://a:99999': port out of range"),
    "origin_not_list": ('[[sources]]\nname = "web"\nwrite_keys = ["k"]\nallowed_origins = "https://a.example"\n',
                        None, "[[sources]] web allowed_origins: expected a list of strings, got str"),
    "negative_rate": ('[[sources]]\nname = "web"\nwrite_keys = ["k"]\nrate_limit_per_second = -1\n', None,
                      "[[sources]] web rate_limit_per_second: must not be negative"),
    "tiny_rate": ('[[sources]]\nname = "web"\nwrite_keys = ["k"]\nrate_limit_per_second = 5e-324\n', None,
                  "[[sources]] web rate_limit_per_second: must be 0 (off) or at least 0.001"),
    "burst_without_rate": ('[[sources]]\nname = "web"\nwrite_keys = ["k"]\nclient_rate_limit_burst = 5\n', None,
                           "[[sources]] web client_rate_limit_burst: needs client_rate_limit_per_second"),
    "fractional_burst": ('[[sources]]\nname = "web"\nwrite_keys = ["k"]\nrate_limit_per_second = 1\n'
                         'rate_limit_burst = 1.5\n', None, "[[sources]] web rate_limit_burst: expected an integer"),
    "public_url_scheme": ('[receiver]\npublic_url = "ftp://t.example"\n', None,
                          "[receiver] public_url: expected http(s)://host[:port][/path]"),
    "public_url_query": ('[receiver]\npublic_url = "https://t.example/?a=1"\n', None,
                         "[receiver] public_url: expected http(s)://host[:port][/path]"),
    "public_url_port": ('[receiver]\npublic_url = "https://t.example:99999"\n', None,
                        "[receiver] public_url: expected http(s)://host[:port][/path]"),
    "sdk_dir_missing": ('[receiver]\nbrowser_sdk_dir = "/nonexistent"\n', None,
                        "[receiver] browser_sdk_dir: /nonexistent/standalone.js not found"),
    "duplicate_source": ('[[sources]]\nname = "web"\nwrite_keys = ["a"]\n'
                         '[[sources]]\nname = "web"\nwrite_keys = ["b"]\n', None,
                         "[[sources]] #2 name: 'web' is used twice"),
}


@pytest.mark.parametrize("text,env,message", ERRORS.values(), ids=ERRORS.keys())
def test_errors_name_the_key_and_the_problem(tmp_path: Path, text: str | None, env: dict[str, str] | None,
                                             message: str) -> None:
    assert message in error_of(tmp_path, text, env)


def test_a_write_key_used_by_two_sources_is_refused_without_echoing_it(tmp_path: Path) -> None:
    text = ('[[sources]]\nname = "web"\nwrite_keys = ["Sh4redSecret"]\n'
            '[[sources]]\nname = "app"\nwrite_keys = ["other", "Sh4redSecret"]\n')

    message = error_of(tmp_path, text)

    assert message == "[[sources]] #2 write_keys: a key of source 'app' is used by another source"
    assert "Sh4redSecret" not in message


def test_a_bad_flag_names_the_flag(tmp_path: Path) -> None:
    assert error_of(tmp_path, receiver={"port": "x"}) == "--port: expected an integer, got 'x'"


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})


@pytest.mark.parametrize("status", [200, 207])
def test_partial_success_status_takes_200_or_207(tmp_path: Path, status: int) -> None:
    from_file = load(tmp_path, f"[receiver]\npartial_success_status = {status}\n")
    from_env = load(tmp_path, env={"TRACKRELAY_RECEIVER_PARTIAL_SUCCESS_STATUS": str(status)})

    assert from_file.receiver.partial_success_status == from_env.receiver.partial_success_status == status


def test_settings_help_lists_every_environment_variable() -> None:
    text = settings_help()

    assert {"database", "receiver"} <= set(SECTIONS)
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert env_name(section, f.name) in text
    assert "TRACKRELAY_DATABASE_URL" in text and "TRACKRELAY_RECEIVER_PORT" in text
    assert "TRACKRELAY_LOG_LEVEL" in text


def test_a_bad_file_value_fails_even_where_the_environment_or_a_flag_overrides_it(tmp_path: Path) -> None:
    text = '[receiver]\nport = "eighty"\n'

    assert error_of(tmp_path, text, {"TRACKRELAY_RECEIVER_PORT": "9000"}) == \
        "[receiver] port: expected an integer, got 'eighty'"
    assert error_of(tmp_path, text, receiver={"port": 9000}) == "[receiver] port: expected an integer, got 'eighty'"


@pytest.mark.parametrize("value", ['"S3cretKey"', '["S3cretKey", 5]'])
def test_a_malformed_write_key_list_is_never_echoed(tmp_path: Path, value: str) -> None:
    path = tmp_path / "trackrelay.toml"
    path.write_text(f'[[sources]]\nname = "web"\nwrite_keys = {value}\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    assert "write_keys: expected a list of strings" in str(error.value)
    assert "S3cretKey" not in str(error.value)


def test_commit_gathering_defaults_to_2_ms_and_0_turns_it_off(tmp_path: Path) -> None:
    assert load(tmp_path).receiver.commit_gather_ms == 2.0
    assert load(tmp_path, env={"TRACKRELAY_RECEIVER_COMMIT_GATHER_MS": "0"}).receiver.commit_gather_ms == 0
    assert load(tmp_path, "[receiver]\ncommit_gather_ms = 0.5\n").receiver.commit_gather_ms == 0.5


def test_fractional_retry_after_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "trackrelay.toml"
    path.write_text("[receiver]\nretry_after_seconds = 0.5\n")
    assert load_config(path, env={}).receiver.retry_after_seconds == 0.5


# --- [[destinations]] ------------------------------------------------------------------------------

NULL_HOOK = '[[destinations]]\nname = "hook"\ntype = "null"\n'

WEBHOOK = '[[destinations]]\nname = "hook"\ntype = "webhook"\nurl = "http://127.0.0.1:9/in"\n'
DESTINATION_ERRORS = {
    "duplicate_name": (NULL_HOOK + NULL_HOOK, "[[destinations]] hook name: used twice"),
    "source_lists_unknown_destination": (
        NULL_HOOK + '[[sources]]\nname = "web"\nwrite_keys = ["k"]\ndestinations = ["hook", "nope"]\n',
        "[[sources]] web destinations: no destination named 'nope' (configured: hook)"),
    "claim_below_batch": (NULL_HOOK + "batch_size = 50\nclaim_size = 10\n",
                          "[[destinations]] hook claim_size: must be at least batch_size"),
    "bad_type_filter": (NULL_HOOK + 'types = ["track", "click"]\n',
                        ("[[destinations]] hook types: 'click' is not one of identify, track, page, screen, "
                         "group, alias")),
    "adapter_refuses_url": ('[[destinations]]\nname = "hook"\ntype = "webhook"\nurl = "ftp://x"\n',
                            ("[[destinations]] hook: destination 'hook': url must be an http:// or https:// URL, "
                             "got 'ftp://x'")),
    "missing_required_option": ('[[destinations]]\nname = "hook"\ntype = "webhook"\n',
                                "[[destinations]] hook url: required"),
    "missing_type": ('[[destinations]]\nname = "hook"\n',
                     "[[destinations]] hook type: required, the name of an installed destination type"),
    "concurrency_word": (WEBHOOK + 'concurrency = "fast"\n',
                         ("[[destinations]] hook: destination 'hook': concurrency must be \"adaptive\" or an "
                          "integer of at least 1, got 'fast'")),
    "concurrency_zero": (WEBHOOK + "concurrency = 0\n",
                         ("[[destinations]] hook: destination 'hook': concurrency must be \"adaptive\" or an "
                          "integer of at least 1, got 0")),
    "concurrency_fraction": (WEBHOOK + "concurrency = 2.5\n",
                             "[[destinations]] hook concurrency: expected an integer, got 2.5"),
    "max_concurrency_zero": (WEBHOOK + "max_concurrency = 0\n",
                             ("[[destinations]] hook: destination 'hook': max_concurrency must be an integer of "
                              "at least 1, got 0")),
}


@pytest.mark.parametrize("text,message", DESTINATION_ERRORS.values(), ids=DESTINATION_ERRORS.keys())
def test_destination_errors_name_the_destination_and_the_problem(tmp_path: Path, text: str, message: str) -> None:
    assert error_of(tmp_path, text) == message


def test_an_unknown_destination_type_names_the_installed_ones(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[[destinations]]\nname = "hook"\ntype = "carrier-pigeon"\n')

    prefix = "[[destinations]] hook type: unknown destination type 'carrier-pigeon' (installed: "
    assert message.startswith(prefix) and message.endswith(")")
    installed = message[len(prefix):-1].split(", ")
    assert {"webhook", "segment", "file", "database", "log", "null"} <= set(installed)
    assert installed == sorted(installed)


@pytest.mark.parametrize(("setting", "expected"), [
    ("", ("adaptive", 256)), ('concurrency = "adaptive"\n', ("adaptive", 256)), ("concurrency = 64\n", (64, 256)),
    ("max_concurrency = 1024\n", ("adaptive", 1024))])
def test_concurrency_is_adaptive_unless_a_number_fixes_it(tmp_path: Path, setting: str,
                                                          expected: tuple[Any, int]) -> None:
    (hook,) = load(tmp_path, WEBHOOK + setting).destinations
    assert (hook.options.concurrency, hook.options.max_concurrency) == expected


def test_fractional_retry_seconds_are_accepted_for_a_destination(tmp_path: Path) -> None:
    config = load(tmp_path, NULL_HOOK + "retry_initial_seconds = 0.05\nretry_max_seconds = 0.2\n")

    (hook,) = config.destinations
    assert (hook.name, hook.type, hook.retry_initial_seconds, hook.retry_max_seconds) == ("hook", "null", 0.05, 0.2)


def test_browser_safety_settings_of_a_source(tmp_path: Path) -> None:
    from pipeline.origins import OriginPattern

    text = ('[receiver]\npublic_url = "https://track.shop.example/c"\n'
            '[[sources]]\nname = "web"\nwrite_keys = ["k"]\n'
            'allowed_origins = ["https://Shop.example", "https://*.shop.example:443", "http://localhost:3000", "null"]\n'
            'rate_limit_per_second = 2.5\nrate_limit_burst = 10\nclient_rate_limit_per_second = 1\n')
    path = tmp_path / "c.toml"
    path.write_text(text)
    config = load_config(path, env={})
    [source] = config.sources
    assert source.allowed_origins == (OriginPattern("https", "shop.example", "", False),
                                      OriginPattern("https", "shop.example", "", True),
                                      OriginPattern("http", "localhost", "3000", False),
                                      OriginPattern("", "null", "", False))
    assert (source.rate_limit_per_second, source.rate_limit_burst) == (2.5, 10)
    assert (source.client_rate_limit_per_second, source.client_rate_limit_burst) == (1.0, 0)
    assert config.receiver.public_url == "https://track.shop.example/c"

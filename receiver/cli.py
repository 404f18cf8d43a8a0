"""The ``trackrelay`` command: run, serve, worker, migrate, status, replay, discard.

Exit status: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from pipeline.config import ConfigError, settings_help
from pipeline.messages import MESSAGE_TYPES
from pipeline.logs import configure_logging
from pipeline.metrics import metrics_folder
from pipeline.migrate import current_revision, upgrade
from pipeline.reload import ConfigSource
from pipeline.store import Store
from pipeline.worker import run_worker
from receiver.operator import discard_command, replay_command, status_command
from receiver.server import DatabaseBehind, check_database, serve

log = logging.getLogger("trackrelay.cli")

EPILOG = f"""\
Settings (flag, then environment, then the --config TOML file, then default):
{settings_help()}
  TRACKRELAY_CONFIG names the config file.
"""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file (env TRACKRELAY_CONFIG)")
    common.add_argument("--database-url", metavar="URL", help="sqlite:///path or postgresql://... "
                        "(env TRACKRELAY_DATABASE_URL)")
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--host", help="address to listen on (env TRACKRELAY_RECEIVER_HOST)")
    server.add_argument("--port", type=int, help="port to listen on, default 8088 (env TRACKRELAY_RECEIVER_PORT)")
    server.add_argument("--processes", type=int, metavar="N",
                        help="receiver processes sharing the port (env TRACKRELAY_RECEIVER_PROCESSES)")
    parser = argparse.ArgumentParser(prog="trackrelay", description="A self-hosted, Segment-compatible "
                                     "HTTP Tracking API with durable delivery.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common, server], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                   help="single-box mode: migrate the database, then receive (and deliver) events")
    sub.add_parser("serve", parents=[common, server], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                   help="the receiver alone; refuses a database that is not migrated")
    sub.add_parser("worker", parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                   help="the pipeline worker alone: decode the outbox and deliver to destinations")
    sub.add_parser("migrate", parents=[common], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                   help="upgrade the database schema to the latest revision")
    status = sub.add_parser("status", parents=[common], help="per destination: pending, in flight, retrying, "
                            "dead, delivered in the last hour; rejected counts")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    replay = sub.add_parser("replay", parents=[common], help="deliver dead (or other) deliveries again, or "
                            "re-decode stored raw requests for a destination",
                            description="Times (--since/--until) are ISO-8601 or durations back from now: 90m, 2h, 3d.")
    replay.add_argument("--destination", required=True, metavar="NAME")
    replay.add_argument("--state", choices=["dead", "delivered", "pending"],
                        help="which deliveries to put back to pending with fresh attempts: dead (default), "
                        "delivered (send again), pending (retry now; in-flight ones are left alone)")
    replay.add_argument("--since", metavar="T")
    replay.add_argument("--until", metavar="T")
    replay.add_argument("--type", choices=list(MESSAGE_TYPES), metavar="TYPE", help="only this message type")
    replay.add_argument("--from-outbox", action="store_true",
                        help="re-decode raw requests received since --since and deliver them to the destination")
    replay.add_argument("--dry-run", action="store_true", help="count, change nothing")
    discard = sub.add_parser("discard", parents=[common], help="delete the pending and dead deliveries of a "
                             "destination no longer configured (an orphan, see status)")
    discard.add_argument("--destination", required=True, metavar="NAME")
    discard.add_argument("--dry-run", action="store_true", help="count, change nothing")
    return parser


def _config_source(args: argparse.Namespace) -> ConfigSource:
    """The file, environment and flags the config is loaded from: at start, and again on SIGHUP."""
    overrides: dict[str, dict[str, Any]] = {
        "database": {"url": args.database_url},
        "receiver": {key: getattr(args, key, None) for key in ("host", "port", "processes")},
        "": {"log_level": args.log_level},
    }
    return ConfigSource(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("run", "serve", "worker"):
        # SIGHUP reloads; until a process has its handler, one must not kill it (the default).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    source = _config_source(args)
    try:
        config = source.load()
    except ConfigError as exc:
        print(f"trackrelay: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    try:
        if args.command == "migrate":
            store = Store.open(config.database)
            try:
                before = current_revision(store.engine)
                upgrade(store.engine)
                after = current_revision(store.engine)
            finally:
                store.dispose()
            log.info("event=migrated from=%s to=%s", before or "none", after)
            return 0
        if args.command in ("status", "replay", "discard"):
            check_database(config)
            command = {"status": status_command, "replay": replay_command, "discard": discard_command}[args.command]
            return command(config, args)
        if args.command == "worker":
            check_database(config)
            with metrics_folder(config.admin.metrics_dir, private=False):
                return run_worker(config, source)
        # Chosen before the fork: every receiver process and the worker write to this folder.
        with metrics_folder(config.admin.metrics_dir, private=config.admin.serving):
            return serve(config, migrate=args.command == "run", with_worker=args.command == "run", source=source)
    except DatabaseBehind as exc:
        print(f"trackrelay: {exc}", file=sys.stderr)
        return 1
    except (SQLAlchemyError, OSError, ValueError) as exc:
        # ValueError: an unsupported URL; OSError: the port is taken; SQLAlchemyError: the
        # database cannot be reached.
        log.error("event=failed command=%s error=%r", args.command, str(exc).splitlines()[0][:300])
        print(f"trackrelay: {args.command} failed: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

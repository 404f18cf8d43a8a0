"""The operator commands' output: ``trackrelay status``, ``replay`` and ``discard``."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import orjson

from pipeline.config import Config
from pipeline.controllers import ControllerStatus
from pipeline.operations import discard_orphaned, orphaned_destinations, parse_moment, replay_deliveries, replay_outbox, status
from pipeline.store import Store


def status_command(config: Config, args: argparse.Namespace) -> int:
    store = Store.open(config.database)
    try:
        result = status(store, config)
    finally:
        store.dispose()
    if args.json:
        print(orjson.dumps(dataclasses.asdict(result), option=orjson.OPT_INDENT_2).decode())
        return 0
    header = ("destination", "pending", "in_flight", "retrying", "dead", "delivered_1h", "oldest_pending",
              "concurrency", "rtt")
    rows = [header]
    for name, d in sorted(result.destinations.items()):
        oldest = "-" if d.oldest_pending_age_seconds is None else f"{d.oldest_pending_age_seconds:.1f}s"
        if name in result.orphaned:
            name += " (orphaned)"
        rows.append((name, str(d.pending), str(d.in_flight), str(d.retrying), str(d.dead),
                     str(d.delivered_last_hour), oldest, *concurrency_cells(d.concurrency)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"outbox pending: {result.outbox_pending}, failed to decode: {result.outbox_failed}")
    print(f"rejected: {result.rejected_total} (last hour: {result.rejected_last_hour})")
    if result.orphaned:
        print(f"orphaned (not configured; their deliveries wait until configured again or "
              f"`trackrelay discard --destination NAME`): {', '.join(result.orphaned)}")
    return 0


def concurrency_cells(controller: ControllerStatus | None) -> tuple[str, str]:
    """``limit/max`` (adaptive) or ``limit(fixed)``, summed over the workers, and the round
    trip; dashes when no worker reports one."""
    if controller is None:
        return "-", "-"
    if controller.mode == "fixed":
        limit = f"{controller.limit}(fixed)"
    else:
        limit = f"{controller.limit}/{controller.max_concurrency}"
    rtt = "-" if controller.rtt_ms is None else f"{controller.rtt_ms:.1f}ms"
    return limit, rtt


def discard_command(config: Config, args: argparse.Namespace) -> int:
    store = Store.open(config.database)
    try:
        try:
            count = discard_orphaned(store, config, args.destination, dry_run=args.dry_run)
        except ValueError as exc:
            print(f"trackrelay: discard: {exc}", file=sys.stderr)
            return 2
        if count == 0 and not args.dry_run:
            orphans = ", ".join(o.name for o in orphaned_destinations(store, config)) or "none"
            print(f"trackrelay: discard: no pending or dead deliveries for {args.destination!r} "
                  f"(orphaned destinations: {orphans})", file=sys.stderr)
    finally:
        store.dispose()
    verb = "would discard" if args.dry_run else "discarded"
    print(f"{verb} {count} deliveries of orphaned destination {args.destination}")
    return 0


def replay_command(config: Config, args: argparse.Namespace) -> int:
    if args.destination not in {d.name for d in config.destinations}:
        known = ", ".join(sorted(d.name for d in config.destinations)) or "none configured"
        print(f"trackrelay: replay: no destination named {args.destination!r} ({known})", file=sys.stderr)
        return 2
    try:
        since = parse_moment(args.since) if args.since else None
        until = parse_moment(args.until) if args.until else None
    except ValueError as exc:
        print(f"trackrelay: replay: {exc}", file=sys.stderr)
        return 2
    if args.from_outbox and (since is None or args.state is not None):
        print("trackrelay: replay: --from-outbox needs --since and takes no --state", file=sys.stderr)
        return 2
    store = Store.open(config.database)
    try:
        if args.from_outbox:
            count = replay_outbox(store, config, args.destination, since, until, args.type, dry_run=args.dry_run)
            what = "events from the outbox"
        else:
            state = args.state or "dead"
            count = replay_deliveries(store, args.destination, state, since, until, args.type, dry_run=args.dry_run)
            what = f"{state} deliveries"
    finally:
        store.dispose()
    verb = "would replay" if args.dry_run else "replayed"
    print(f"{verb} {count} {what} to {args.destination}")
    return 0

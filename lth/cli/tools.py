"""``lth settings``, ``lth data`` and ``lth migrate``: the settings reference, data set downloads and
the move of stores written before runs could grow."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import Command


def add_settings(sub) -> None:
    sub.add_parser("settings", help="list every experiment setting with its default and meaning")


def run_settings(args) -> int:
    from ..config import describe_fields
    print(describe_fields())
    return 0


def add_data(sub) -> None:
    p = sub.add_parser("data", help="data set utilities")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    d = dsub.add_parser("download", help="download a data set (needs the internet), checking sha256",
                        description="Fetch the official files of mnist, cifar10, tinystories (its validation "
                                    "file, 19 MB) or wikitext2 (the raw archive) into $LTH_DATA_DIR/<name> "
                                    "(default ~/.cache/lth/data), verify their pinned sha256 and write them "
                                    "atomically; then data.name = <name> reads them.")
    d.add_argument("name", choices=["mnist", "cifar10", "tinystories", "wikitext2"], help="data set to fetch")
    d.add_argument("--dest", default=None, help="data root (default: $LTH_DATA_DIR or ~/.cache/lth/data)")
    p.set_defaults(data_parser=p)


def run_data(args) -> int:
    if args.data_command != "download":  # `lth data` alone: its help, as `lth data --help` prints it
        args.data_parser.print_help()
        sys.exit(0)
    from ..download import download
    path = download(args.name, Path(args.dest) if args.dest else None)
    print(f"{args.name}: ready in {path}")
    return 0


def add_migrate(sub) -> None:
    p = sub.add_parser("migrate", help="rename run folders written before runs could grow to their current run ids",
                       description="Run ids no longer hash prune.levels, seeds and arms (a rerun with more of "
                                   "them grows the run). Moves each run folder named by the old id scheme to its "
                                   "new id and rewrites the id where it is recorded (hparams.json, metrics, quant "
                                   "cells). Refuses, changing nothing, when a new id's folder exists already.")
    p.add_argument("root", help="the store (results folder), e.g. runs")
    p.add_argument("--dry-run", action="store_true", help="only print what would move")


def run_migrate(args) -> int:
    from ..migrate import migrate
    migrate(args.root, dry_run=args.dry_run)
    return 0


COMMANDS = [Command("settings", add_settings, run_settings), Command("data", add_data, run_data),
            Command("migrate", add_migrate, run_migrate)]

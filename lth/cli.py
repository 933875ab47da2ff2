"""Command line: thin edges over library calls. ``lth --help`` lists the commands."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2

_SET_HELP = ("override one setting, e.g. --set train.lr=0.01 --set seeds=[0,1,2]; values use TOML "
             "syntax, bare words are strings; repeatable. `lth settings` lists every setting")


def _add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment TOML file (see experiments/)")
    p.add_argument("--out", default="runs", help="store root folder; results go to OUT/<run_id> "
                   "(default: ./runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=_SET_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lth", description="Lottery Ticket Hypothesis and model compression experiments in JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `lth COMMAND --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train the dense network of every seed as one population",
                       description="Train the dense network for every seed in `seeds` as one vmapped "
                                   "population (prune.levels is ignored) and write OUT/<run_id>/"
                                   "hparams.json plus level_000/metrics.parquet.")
    _add_experiment_args(p)

    p = sub.add_parser("lottery", help="iterative magnitude pruning with rewinding and controls",
                       description="Run IMP: level 0 trains dense; each level prunes prune.rate of the "
                                   "remaining weights by magnitude, rewinds and retrains every arm x seed "
                                   "as one population. Rerunning resumes at the first incomplete level; a "
                                   "finished run does no training.")
    _add_experiment_args(p)

    p = sub.add_parser("report", help="figures and tables from a results folder",
                       description="Turn a results folder into figures (PDF + PNG: accuracy and early-stop "
                                   "step vs weights remaining, learning curves) and tables (summary.csv, "
                                   ".tex, .md: one row per run x arm x level), with a README.md listing them.")
    p.add_argument("root", help="results folder (store root or one run folder)")
    p.add_argument("--out", default="figures", help="folder for figures and tables (default: ./figures)")

    p = sub.add_parser("settings", help="list every experiment setting with its default and meaning")

    p = sub.add_parser("data", help="data set utilities")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    d = dsub.add_parser("download", help="download a data set (needs the internet), checking sha256",
                        description="Fetch the official archives of mnist or cifar10 into "
                                    "$LTH_DATA_DIR/<name> (default ~/.cache/lth/data), verify their "
                                    "sha256 and write them atomically.")
    d.add_argument("name", choices=["mnist", "cifar10"], help="data set to fetch")
    d.add_argument("--dest", default=None, help="data root (default: $LTH_DATA_DIR or ~/.cache/lth/data)")
    return parser


def _error(msg: str) -> int:
    print(f"lth: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _cmd_experiment(args, train_only: bool) -> int:
    from .config import load_experiment
    from .lottery import run_lottery

    cfg = load_experiment(args.experiment, args.overrides)
    if train_only:
        cfg = cfg.replace(prune=dataclasses.replace(cfg.prune, levels=0), arms=("ticket",))
    t0 = time.time()
    store = run_lottery(cfg, args.out, progress=not args.no_progress and cfg.log.progress)
    _print_summary(store.path, time.time() - t0)
    return 0


def _print_summary(run_dir: Path, wall_s: float) -> None:
    from analysis import load_runs, final_accuracy

    df = load_runs(run_dir.parent, run_ids=[run_dir.name])
    table = final_accuracy(df)
    print(f"run {run_dir.name}: {run_dir}  ({wall_s:.1f} s)")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from .config import ConfigError, describe_fields
    from .data import DataError
    from .store import StoreError

    try:
        if args.command in ("train", "lottery"):
            return _cmd_experiment(args, train_only=args.command == "train")
        if args.command == "report":
            from analysis.report import write_report
            from analysis.runs import NotAStoreError
            try:
                made = write_report(args.root, args.out)
            except NotAStoreError as e:
                return _error(str(e))
            print(f"wrote {len(made)} figures and summary tables to {args.out}/ (see {args.out}/README.md)")
            return 0
        if args.command == "settings":
            print(describe_fields())
            return 0
        if args.command == "data":
            if args.data_command != "download":
                parser.parse_args(["data", "--help"])
            from .download import download
            path = download(args.name, Path(args.dest) if args.dest else None)
            print(f"{args.name}: ready in {path}")
            return 0
    except (ConfigError, DataError, StoreError) as e:
        return _error(str(e))
    except KeyboardInterrupt:
        print("lth: interrupted; completed levels are kept and a rerun resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

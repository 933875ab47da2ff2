"""What the command modules share: the command record, error exit, experiment arguments, summaries."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

EXIT_USAGE = 2

_SET_HELP = ("override one setting, e.g. --set train.lr=0.01 --set seeds=[0,1,2]; values use TOML "
             "syntax, bare words are strings; repeatable. `lth settings` lists every setting")


@dataclass(frozen=True)
class Command:
    """One ``lth`` command: ``add_parser(subparsers)`` adds its parser, ``run(args)`` returns the exit code."""
    name: str
    add_parser: Callable[[Any], None]  # gets the subparsers object of ``lth``
    run: Callable[[argparse.Namespace], int]


def error(msg: str, code: int = EXIT_USAGE) -> int:
    print(f"lth: error: {msg}", file=sys.stderr)
    return code


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment TOML file (see experiments/)")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="more overrides in the same form as --set (as W&B sweep agents pass them)")
    p.add_argument("--out", default="runs", help="store root folder; results go to OUT/<run_id> "
                   "(default: ./runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=_SET_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_code_arg(p: argparse.ArgumentParser) -> None:
    """``--code NAME`` (repeatable): user code a stored run names that the user trusts (main() passes it
    to :func:`lth.registry.trust`); lth never imports code named inside a file otherwise."""
    p.add_argument("--code", action="append", default=[], metavar="NAME",
                   help="an import path (package.module:callable) or entry-point name that the run's "
                        "model.name or data.name is, to allow lth to import it; a stored run never makes lth "
                        "import code by itself (repeatable)")


def ints(values) -> list[int]:
    """Sorted distinct values as plain ints (numpy scalars print as np.int64(0))."""
    return sorted({int(v) for v in values})


def int_list(text: str, what: str) -> list[int]:
    from ..config import ConfigError
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 0:
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers >= 0")
    return values


def print_summary(run_dir: Path, wall_s: float, df=None) -> None:
    """The final accuracy per (level, arm) of a run: of ``df`` (its rows, e.g. only the members an
    experiment asked for), default every row the run's folder holds."""
    from analysis import load_runs, final_accuracy
    from analysis.tables import percent_columns

    from analysis.summary import is_language_model

    df = load_runs(run_dir.parent, run_ids=[run_dir.name]) if df is None else df
    if is_language_model(df):  # judged by test bits per byte (lower is better), not per-token accuracy
        table = percent_columns(final_accuracy(df.assign(accuracy=df["bits_per_byte"])), ["density"])
        table = table.rename(columns={"accuracy": "bits_per_byte", "accuracy_std": "bits_per_byte_std"})
    else:
        table = percent_columns(final_accuracy(df), ["density", "accuracy", "accuracy_std"])  # a person reads %
    print(f"run {run_dir.name}: {run_dir}  ({wall_s:.1f} s)")
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    if "diverged_step" in df:
        from ..train import DIVERGENCE_FACTOR
        bad = df[df["diverged_step"] >= 0].drop_duplicates(["level", "arm", "seed"])
        for r in bad.itertuples():
            print(f"diverged: level {int(r.level)} {r.arm} seed {int(r.seed)} at step {int(r.diverged_step)} "
                  f"(training loss non-finite or above {DIVERGENCE_FACTOR:g}x its first-step value)")

"""Command line: thin edges over library calls. ``lth --help`` lists the commands.

The commands form one table, :data:`COMMANDS` (name -> :class:`~lth.cli.common.Command`: its parser
and its function), in the manner of open_lth's ``cli/runner_registry.py``; each module of this
package contributes its entries. Heavy imports (jax, pandas, the library) happen inside the command
functions, so ``lth --help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import experiment, prune, quant, report, speed, stability, sweep, tools
from .common import EXIT_USAGE, Command, error

# In the order ``lth --help`` lists them (pipeline order).
COMMANDS: dict[str, Command] = {c.name: c for module in (experiment, sweep, report, stability, prune, speed, quant, tools)
                                for c in module.COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lth", description="Lottery Ticket Hypothesis and model compression experiments in JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `lth COMMAND --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


# Commands that end with a ``compiles:`` line on stderr (:mod:`lth.compiles`): those that train or quantize.
COUNTED = ("train", "lottery", "sweep", "quantize")


def _run_counted(args) -> int:
    """Run a command, then print what it compiled: ``compiles: N (X s); cache hits: M (Y s); tracing Z s``
    (this process and, for ``lth sweep``, its worker processes)."""
    from ..compiles import counting

    with counting() as count:
        code = COMMANDS[args.command].run(args)
    if code != EXIT_USAGE:
        for other in getattr(args, "worker_compiles", ()):  # set by lth sweep from its worker processes
            count.add(other)
        print(count.line(), file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from ..config import ConfigError
    from ..data import DataError
    from ..registry import RegistryError, trust
    from ..store import StoreError

    trust(*getattr(args, "code", None) or [])  # user code named on the command line (--code)
    try:
        if args.command in COUNTED:
            return _run_counted(args)
        return COMMANDS[args.command].run(args)
    except (ConfigError, DataError, StoreError, RegistryError) as e:
        return error(str(e))
    except OSError as e:  # a full disk, a read-only folder, a path that is a folder: name it, no traceback
        where = f"{e.filename}: " if e.filename else ""
        return error(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print("lth: interrupted; completed levels are kept and a rerun resumes", file=sys.stderr)
        return 130

"""``lth quantize``, ``lth export`` and ``lth eval-export``: the quantization commands.

Thin edges over :func:`lth.quant.quantize_run` (the quant stage's code path on a stored run),
:func:`lth.quant.export_level` and :func:`lth.quant.eval_export`; :data:`COMMANDS` puts them in
``lth``'s command table. A ValueError (a bad setting, an unsupported model) exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import wraps
from pathlib import Path

from .common import Command, error, add_code_arg

def _csv(kind):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. 8,4,2")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None

    return parse


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true/false")


def _add_common(p: argparse.ArgumentParser, many: bool) -> None:
    """Quantizer options shared by quantize (lists, swept) and export (one value each)."""
    lst = (lambda k: _csv(k)) if many else (lambda k: k)
    sweep = " (comma-separated list: each value is swept)" if many else ""
    p.add_argument("--scheme", type=lst(str), default=None,
                   help="sym: signed ints, zero point 0; asym: unsigned with a zero point" + sweep
                        + " (default: sym)")
    p.add_argument("--granularity", type=lst(str), default=None,
                   help="weight scales per output channel or per tensor" + sweep + " (default: channel)")
    p.add_argument("--calibration", type=lst(str), default=None,
                   help="range method: minmax, percentile (clip outliers) or mse (least-error range search)"
                        + sweep + "; with --retry, the order tried (default: minmax)")
    p.add_argument("--act-bits", type=int, default=None,
                   help="activation bits at the input of every Dense/Conv, 2..8 (default: 8)")
    p.add_argument("--weights-only", action="store_true",
                   help="quantize weights only, keep activations float (not for export)" if many else
                   argparse.SUPPRESS)
    p.add_argument("--calib-batches", type=int, default=None,
                   help="training batches used to calibrate activation ranges and bias correction (default: 8)")
    p.add_argument("--percentile", type=float, default=None,
                   help="percentile calibration clips at the 100-p and p percentiles (default: 99.99)")
    p.add_argument("--bias-correction", action="store_true",
                   help="PTQ: empirical bias correction of the expected output shift (Nagel et al. 2019)")
    p.add_argument("--cle", action="store_true",
                   help="PTQ: cross-layer equalization of consecutive ReLU layers first (Nagel et al. 2019)")
    p.add_argument("--learned-scale", action="store_true",
                   help="QAT: learn the scales (LSQ, Esser et al. 2020) instead of recomputing ranges each step")
    p.add_argument("--qat-steps", type=int, default=None,
                   help="QAT fine-tuning steps (default: one epoch; full training with --qat-start rewind)")
    p.add_argument("--qat-lr", type=float, default=None,
                   help="QAT learning rate, constant (default: train.lr / 10)")


def add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize", help="PTQ/QAT sweep over the tickets of a stored run",
        description="Add quant cells to a stored run: the members of every arm (or quant.arms) of its "
                    "levels quantized for every combination of bits, method, scheme, granularity and "
                    "calibration, with the code of the experiment's quant stage. Each (level, arm, setting) "
                    "is one cell, stored in OUT/<run_id>/level_NNN/quant/ (one row per seed: accuracy, "
                    "float_accuracy, size_bytes, compression vs fp32 dense, ...); cells already done are "
                    "skipped. Settings: the defaults, then --config's [quant] table (without --config: the "
                    "[quant] settings of the experiment that last ran the run's quant stage, recorded in "
                    "OUT/<run_id>/quant_settings.json), then --set quant.KEY=VALUE, then the options below. "
                    "Prints the new rows.")
    p.add_argument("run_dir", help="a run folder OUT/<run_id> written by `lth lottery`")
    add_code_arg(p)
    p.add_argument("--config", default=None, metavar="TOML",
                   help="read the settings from the [quant] table of this TOML file (default: the [quant] "
                        "settings the run records, of the experiment that last ran its quant stage); options "
                        "given here override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="quant.KEY=VALUE",
                   help="override one quant setting, e.g. --set quant.bits=[8,4] (TOML values); repeatable")
    p.add_argument("--arms", type=_csv(str), default=None,
                   help="comma-separated arms to quantize (default: every arm of the run)")
    p.add_argument("--recompute", action="store_true", help="recompute cells that are already done")
    p.add_argument("--levels", type=_csv(int), default=None,
                   help="comma-separated levels to quantize (default: quant.levels; its default: every complete level)")
    p.add_argument("--bits", type=_csv(int), default=None,
                   help="weight bit widths, comma-separated, from 8,4,3,2,1 (1 = binary) (default: 8,4,2)")
    p.add_argument("--method", type=_csv(str), default=None,
                   help="ptq (post-training), qat (quantization-aware fine-tuning) and/or gptq (Frantar et al. "
                        "2023; quant.group_size, quant.act_order, quant.gptq_damp), comma-separated (default: ptq)")
    _add_common(p, many=True)
    p.add_argument("--retry", action="store_true",
                   help="try the --calibration methods in order until the val accuracy drop is within "
                        "--tolerance; record the one chosen")
    p.add_argument("--tolerance", type=float, default=None,
                   help="allowed val accuracy drop for --retry, as a fraction (0.01 = 1 point; default 0.005)")
    p.add_argument("--qat-start", choices=["trained", "rewind"], default=None,
                   help="QAT starts from the trained ticket (default) or from the rewind point")
    p.add_argument("--no-write", action="store_true", help="print the table only; do not write cells")


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write one quantized ticket as a compressed integer file",
        description="Quantize one ticket member of a level (weights to --bits, activations to --act-bits) and "
                    "write it as a compressed file (header + packed sparse integer weights; no pickle), "
                    "atomically. Prints its size, compression vs fp32 dense and integer-inference accuracy.")
    p.add_argument("run_dir", help="a run folder OUT/<run_id> written by `lth lottery`")
    add_code_arg(p)
    p.add_argument("--level", type=int, required=True, help="the level whose ticket is exported")
    p.add_argument("--bits", type=int, required=True, help="weight bits: 8, 4, 3, 2 or 1 (binary)")
    p.add_argument("--out", required=True, help="the file to write, e.g. ticket_l8_4bit.lthq")
    p.add_argument("--member", type=int, default=0,
                   help="which ticket member (seed) of the level, by position (default: 0)")
    p.add_argument("--method", choices=["ptq", "qat", "gptq"], default="ptq",
                   help="ptq (default), qat or gptq (Frantar et al. 2023)")
    p.add_argument("--group-size", type=int, default=None,
                   help="gptq: one scale per group of this many inputs of a channel (default: per channel)")
    p.add_argument("--act-order", action="store_true", help="gptq: sweep inputs by decreasing Hessian diagonal")
    _add_common(p, many=False)


def add_eval_export(sub) -> None:
    p = sub.add_parser(
        "eval-export", help="reload an exported file and report its accuracy",
        description="Read a file written by `lth export`, check its checksum, run its integer model "
                    "(int8 operands, int32 accumulation) on the data set it names (or --data) and print the accuracy "
                    "and sizes.")
    p.add_argument("file", help="a file written by `lth export`")
    p.add_argument("--split", choices=["test", "val"], default="test", help="split to evaluate (default: test)")
    p.add_argument("--data", default=None, metavar="NAME",
                   help="evaluate on this data set instead of the one the header names: a registered name, "
                        "an entry point or an import path package.module:loader. The header's own name is "
                        "used only when it is a built-in data set (a file never makes lth import code)")


def _settings(args) -> dict:
    """QuantConfig fields set on the command line (unset ones keep their defaults)."""
    out = {}
    for name in ("scheme", "granularity", "calibration", "act_bits", "calib_batches", "percentile", "qat_steps",
                 "qat_lr", "tolerance", "qat_start", "arms", "group_size"):
        v = getattr(args, name, None)
        if v is not None:
            out[name] = v
    for name in ("bias_correction", "cle", "learned_scale", "retry", "act_order"):
        if getattr(args, name, False):
            out[name] = True
    if getattr(args, "weights_only", False):
        out["activations"] = False
    return out


def _quant_base(args):
    """The quant settings before the options: the defaults, then --config's [quant] (without --config: the
    [quant] settings the run records, when it does), then --set quant.*. Says on stderr which it used."""
    from ..config import ConfigError, QuantConfig, apply_overrides, load_raw
    from ..stored import QUANT_SETTINGS, stored_quant_settings

    raw: dict = {"quant": {}}
    last = None
    if args.config:
        table = load_raw(args.config).get("quant", {})
        raw["quant"].update(table if isinstance(table, dict) else {"": table})
        _log(f"quant settings: the [quant] table of {args.config}, then the options")
    else:
        last = stored_quant_settings(args.run_dir)
        if last is not None:
            raw["quant"].update(last[0])
            _log(f"quant settings: the [quant] table of {last[1]}, recorded with the run "
                 f"({Path(args.run_dir) / QUANT_SETTINGS}), then the options")
        else:
            _log("quant settings: the defaults (the run records no quant settings), then the options")
    bad = [o for o in args.overrides if not o.strip().startswith("quant.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: lth quantize takes quant.* settings only (the run's other settings "
                          "are fixed by its run id)")
    raw = apply_overrides(raw, args.overrides)
    where = args.config or (str(Path(args.run_dir) / QUANT_SETTINGS) if last is not None else None)
    return QuantConfig.from_dict(raw["quant"], " ".join(filter(None, [where, *args.overrides])) or "quant")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_levels_writable(run_dir, levels) -> None:
    """StoreError before any quantization when a level folder that gets quant cells is read-only."""
    from ..store import check_writable

    run = Path(run_dir)
    dirs = sorted(run.glob("level_[0-9][0-9][0-9]")) if levels is None else [run / f"level_{L:03d}" for L in levels]
    for d in dirs:
        if d.is_dir():
            check_writable(d)


def _bad_setting_exits_2(run):
    @wraps(run)
    def checked(args) -> int:
        try:
            return run(args)
        except ValueError as e:  # includes ConfigError: a bad setting or an unsupported model
            return error(str(e))
    return checked


@_bad_setting_exits_2
def run_quantize(args) -> int:
    from ..quant import quantize_run

    t0 = time.time()
    if not args.no_write:
        _check_levels_writable(args.run_dir, args.levels)
    df = quantize_run(args.run_dir, args.levels, args.bits, args.method, config=_quant_base(args),
                      write=not args.no_write, recompute=args.recompute, log=_log, **_settings(args))
    cols = ["level", "arm", "seed", "density", "bits", "scheme", "granularity", "calibration", "method",
            "accuracy", "float_accuracy", "size_bytes", "compression"]
    if len(df) and df["bits_per_byte"].notna().any():  # a language model: bits per byte, lower is better
        cols[cols.index("accuracy"):cols.index("float_accuracy") + 1] = ["bits_per_byte", "float_bits_per_byte"]
    from analysis.tables import percent_columns
    shown = percent_columns(df[cols], ["density", "accuracy", "float_accuracy"]) if len(df) else df
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}") if len(df) else
          "nothing to compute: every cell is done (--recompute redoes them)")
    where = "" if args.no_write else " -> level_NNN/quant/"
    print(f"{len(df)} rows in {time.time() - t0:.1f} s{where}")
    return 0


@_bad_setting_exits_2
def run_export(args) -> int:
    from ..quant import export_level
    from ..store import StoreError

    out = Path(args.out)
    if out.is_dir():
        raise StoreError(f"--out {out} is a folder; give the file to write, e.g. {out / 'ticket.lthq'}")
    s = _settings(args)
    kw = {k: (v[0] if isinstance(v, list) else v) for k, v in s.items()
          if k in ("scheme", "granularity", "calibration", "act_bits")}
    rest = {k: v for k, v in s.items() if k not in kw and k != "activations"}
    r = export_level(args.run_dir, args.level, args.bits, args.out, member=args.member, method=args.method,
                     **kw, **rest)
    print(f"wrote {r['path']}: {r['file_bytes']} bytes on disk, payload {r['size_bytes']} bytes, "
          f"{r['compression']:.1f}x smaller than fp32 dense ({r['fp32_dense_bytes']} bytes)")
    print(f"test accuracy: integer {100 * r['integer_accuracy']:.2f}%, "
          f"fake-quant {100 * r['fake_quant_accuracy']:.2f}%, prediction agreement {100 * r['agreement']:.2f}%")
    return 0


@_bad_setting_exits_2
def run_eval_export(args) -> int:
    from ..quant import eval_export

    r = eval_export(args.file, args.split, data=args.data)
    print(f"{r['path']}: {r['model']} level {r['level']} {r['method']} {r['bits']}-bit {r['scheme']}, "
          f"{r['split']} accuracy {100 * r['accuracy']:.2f}% on {r['n']} examples")
    print(f"size: payload {r['size_bytes']} bytes ({r['compression']:.1f}x vs fp32 dense), "
          f"file {r['file_bytes']} bytes")
    return 0


COMMANDS = [Command("quantize", add_quantize, run_quantize), Command("export", add_export, run_export),
            Command("eval-export", add_eval_export, run_eval_export)]

"""``lth sensitivity`` and ``lth compact``: per-layer pruning sensitivity, compaction of structured tickets."""

from __future__ import annotations

from pathlib import Path

from .common import Command, error, add_code_arg


def add_sensitivity(sub) -> None:
    p = sub.add_parser("sensitivity", help="prune each layer alone to each density and evaluate",
                       description="Layer-wise sensitivity: prune each prunable layer of a level's trained "
                                   "ticket alone, by magnitude, to each density (no retraining), evaluate "
                                   "on val and test, write level_L/sensitivity.parquet and a figure.")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    add_code_arg(p)
    p.add_argument("--level", type=int, default=0, help="IMP level whose ticket is analysed (default 0)")
    p.add_argument("--densities", default="0.9,0.7,0.5,0.3,0.2,0.1,0.05",
                   help="comma-separated densities to prune each layer to (default 0.9,...,0.05)")
    p.add_argument("--out", default=None, help="folder for the figure (default: the level folder)")
    p.add_argument("--to-rates", type=float, default=None, metavar="TOL",
                   help="print per-layer prune.rates keeping each layer's val accuracy drop <= TOL "
                        "(a fraction, e.g. 0.01; for a language model: val bits per byte gained <= TOL) "
                        "after the run's prune.levels levels")


def run_sensitivity(args) -> int:
    from ..config import ConfigError
    from ..prune.sensitivity import rates_for, sensitivity
    from ..store import check_writable

    try:
        densities = [float(d) for d in args.densities.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--densities {args.densities!r}: expected comma-separated numbers") from None
    level_dir = Path(args.run_dir) / f"level_{args.level:03d}"
    out = Path(args.out) if args.out else level_dir
    if level_dir.is_dir():  # both get files: fail now, not after the computation
        check_writable(level_dir)
    if out.exists() and not out.is_dir():
        return error(f"--out {out} exists and is a file; choose a folder")
    if out.is_dir():
        check_writable(out)

    def figure(table) -> None:  # under the run's lock: the level folder is not swapped by a grow meanwhile
        import matplotlib.pyplot as plt
        from analysis.figures import sensitivity_curves
        out.mkdir(parents=True, exist_ok=True)
        fig = sensitivity_curves(table)
        for ext in ("pdf", "png"):
            fig.savefig(out / f"sensitivity.{ext}", dpi=200)
        plt.close(fig)

    table = sensitivity(args.run_dir, args.level, densities, then=figure)
    metric = table["metric"].iloc[0] if len(table) else "accuracy"
    test = table[table["split"] == "test"].pivot(index="layer", columns="density", values=metric)
    print(f"test {metric.replace('_', ' ')}{' (lower is better)' if metric == 'bits_per_byte' else ''}:")
    print(test.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"table: {Path(args.run_dir) / f'level_{args.level:03d}' / 'sensitivity.parquet'}; "
          f"figure: {out / 'sensitivity.pdf'}")
    if args.to_rates is not None:
        from ..stored import run_config
        levels = run_config(args.run_dir)[0].prune.levels
        rates = rates_for(table, args.to_rates, levels)
        inline = ", ".join(f'"{k}" = {v}' for k, v in rates.items())
        print(f"# per-layer rates for {levels} levels, val drop <= {args.to_rates}:")
        print(f"--set 'prune.rates={{{inline}}}'")
    return 0


def add_compact(sub) -> None:
    p = sub.add_parser("compact", help="turn a structurally pruned network into a smaller dense one",
                       description="Build the physically smaller dense network of a level's structurally "
                                   "pruned ticket (prune.granularity = neuron or filter; head or neuron for a "
                                   "vit or gpt: fewer heads and MLP units), check that its outputs equal the "
                                   "masked network's, and report parameter counts and measured inference "
                                   "latency of masked vs compact on the same batch.")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    add_code_arg(p)
    p.add_argument("--level", type=int, required=True, help="IMP level to compact")
    p.add_argument("--batch", type=int, default=1000, help="test examples in the timed batch (default 1000)")


def run_compact(args) -> int:
    from ..prune.structured import compact_run
    try:
        r = compact_run(args.run_dir, args.level, batch=args.batch)
    except ValueError as e:
        return error(str(e))
    for k, v in r.items():
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    print(f"{'speedup':>20}: {r['latency_masked_ms'] / r['latency_compact_ms']:.2f}x")
    if not r["max_abs_diff"] <= r["tolerance"]:
        return error(f"the compact network of level {args.level} of {args.run_dir} does not compute the masked "
                     f"network: max |output difference| {r['max_abs_diff']:.3g} > tolerance {r['tolerance']:.3g} "
                     "(float rounding stays far below it); do not use this compact network", code=1)
    return 0


COMMANDS = [Command("sensitivity", add_sensitivity, run_sensitivity), Command("compact", add_compact, run_compact)]

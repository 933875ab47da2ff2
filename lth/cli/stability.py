"""``lth stability``: instability vs rewind step of one stored level (Frankle et al. 2020)."""

from __future__ import annotations

import sys

from .common import Command, int_list, add_code_arg


def add_stability(sub) -> None:
    p = sub.add_parser(
        "stability", help="instability vs rewind step of one level of a run",
        description="For each rewind step k: the level's masks (ticket and controls) with the dense run's "
                    "weights at step k (rebuilt from init.msgpack), two copies that differ only in SGD noise "
                    "trained from k to the end, and the test error along the straight line between them. "
                    "Instability = max error on the path - mean of the endpoint errors. Results are stored "
                    "under RUN_DIR/stability_rewind/ (checksummed) and reused on a rerun; `lth report` draws "
                    "them.")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    add_code_arg(p)
    p.add_argument("--level", type=int, required=True, help="IMP level (0 = the dense network)")
    p.add_argument("--rewind-steps", required=True, help="comma-separated steps k, e.g. 0,100,500")
    p.add_argument("--points", type=int, default=None, help="points on the path (default: stability.points, 30)")
    p.add_argument("--bn-batches", type=int, default=None,
                   help="batch-norm models: training batches for the statistics of each point (default: 8)")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: every arm of the level)")


def run_stability(args) -> int:
    from ..lottery.stability import rewind_stability
    from analysis import instability_table

    steps = int_list(args.rewind_steps, "--rewind-steps")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    rows = rewind_stability(args.run_dir, args.level, steps, points=args.points, bn_batches=args.bn_batches,
                            arms=arms, log=lambda m: print(f"lth: {m}", file=sys.stderr))
    t = instability_table(rows.assign(experiment="", source="rewind"))
    summary = (t.groupby(["rewind_step", "arm"])
               .agg(density=("density", "mean"), instability=("instability", "mean"),
                    instability_max=("instability", "max"), error_0=("error_0", "mean"), seeds=("seed", "nunique"))
               .reset_index())
    print(f"level {args.level}: instability (error barrier) vs rewind step, mean over seeds")
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


COMMANDS = [Command("stability", add_stability, run_stability)]

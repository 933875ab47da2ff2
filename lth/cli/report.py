"""``lth report`` and ``lth sparsity``: figures, tables and per-layer sparsity from the store."""

from __future__ import annotations

from pathlib import Path

from .common import Command, error, ints


def add_report(sub) -> None:
    p = sub.add_parser("report", help="figures and tables from a results folder",
                       description="Turn a results folder into figures (PDF + PNG: accuracy and early-stop "
                                   "step vs weights remaining, learning curves) and tables (summary.csv, "
                                   ".tex, .md: one row per run x arm x level), with a README.md listing them.")
    p.add_argument("root", help="results folder (store root or one run folder)")
    p.add_argument("--out", default="figures", help="folder for figures and tables (default: ./figures)")
    p.add_argument("--runs", default=None, metavar="ID,...",
                   help="report only these run ids (comma-separated; default: every run in the folder). Runs are "
                        "never averaged together: each is its own line or figure, labelled by the settings that "
                        "differ; several experiments (names, data or models) get one subfolder each")
    p.add_argument("--by", default=None, metavar="KEY",
                   help="facet the accuracy and early-stop figures by a setting, one panel per value (a dotted "
                        "hparams key, e.g. prune.rate)")
    p.add_argument("--wandb", nargs="?", const="runs", default=None, choices=["runs", "offline", "online"],
                   help="also log the figures (PNG) as images to W&B, in a run '<run id>/report' of the run's "
                        "group (mode: the runs' log.wandb, or offline/online)")


def run_report(args) -> int:
    from analysis.report import write_report
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return error(f"--out {args.out} exists and is a file; choose a folder for the figures")
    try:
        runs = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs is not None else None
        if runs is not None and not runs:
            return error("--runs: give one or more run ids, comma-separated (the folder names under the store)")
        made = write_report(args.root, args.out, runs=runs, by=args.by)
    except ValueError as e:  # NotAStoreError, or a store with no completed level
        return error(str(e))
    print(f"wrote {len(made)} figures and summary tables to {args.out}/ (see {args.out}/README.md)")
    if args.wandb is not None:
        from ..wandb_log import log_report
        name = log_report(args.root, args.out, None if args.wandb == "runs" else args.wandb)
        print(f"logged the figures to W&B run {name}" if name else "W&B: nothing logged (log.wandb = 'disabled' "
              "or no PNG figure)")
    return 0


def add_sparsity(sub) -> None:
    p = sub.add_parser("sparsity", help="per-layer sparsity report of a run",
                       description="Per layer and in total: shape, count, non-zeros (kept by the mask) and "
                                   "density of weights and biases, for one level of a run (from the store).")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    p.add_argument("--level", type=int, default=None, help="IMP level (default: the last completed)")
    p.add_argument("--arm", default="ticket", help="arm to report (default: ticket)")
    p.add_argument("--seed", type=int, default=None, help="seed to report (default: the first)")


def run_sparsity(args) -> int:
    from analysis import load_sparsity

    table = load_sparsity(args.run_dir)
    if table.empty:
        return error(f"{args.run_dir}: no completed level with a sparsity report (is it a run folder?)")
    level = int(table["level"].max()) if args.level is None else args.level
    t = table[(table["level"] == level) & (table["arm"] == args.arm)]
    if t.empty:
        return error(f"{args.run_dir}: no {args.arm!r} members at level {level}; levels: "
                      f"{ints(table['level'])}, arms: {sorted(map(str, table['arm'].unique()))}")
    seed = int(t["seed"].min()) if args.seed is None else args.seed
    if seed not in set(t["seed"]):
        return error(f"{args.run_dir}: level {level} has no {args.arm!r} member of seed {seed}; seeds: "
                      f"{ints(t['seed'])}")
    t = t[t["seed"] == seed][["layer", "kind", "shape", "count", "kept", "nonzero", "density", "prunable"]]
    total = {"layer": "total", "kind": "", "shape": "", "count": t["count"].sum(), "kept": t["kept"].sum(),
             "nonzero": t["nonzero"].sum(), "density": t["kept"].sum() / t["count"].sum(), "prunable": ""}
    prun = t[t["prunable"] == True]  # noqa: E712
    weights = {"layer": "prunable", "kind": "", "shape": "", "count": prun["count"].sum(),
               "kept": prun["kept"].sum(), "nonzero": prun["nonzero"].sum(),
               "density": prun["kept"].sum() / max(1, prun["count"].sum()), "prunable": ""}
    import pandas as pd
    t = pd.concat([t, pd.DataFrame([weights, total])], ignore_index=True)
    print(f"level {level}, arm {args.arm}, seed {seed}")
    print(t.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


COMMANDS = [Command("report", add_report, run_report), Command("sparsity", add_sparsity, run_sparsity)]

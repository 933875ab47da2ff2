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
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="more overrides in the same form as --set (as W&B sweep agents pass them)")
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

    p = sub.add_parser("train", help="train the dense network (or a given mask) of every seed as one population",
                       description="Train the dense network for every seed in `seeds` as one vmapped "
                                   "population (prune.levels is ignored) and write OUT/<run_id>/"
                                   "hparams.json plus level_000/metrics.parquet. With --mask, train that "
                                   "mask instead: each seed starts from its own init (the dense run's) with "
                                   "the mask applied, and pruned weights stay exactly 0. The run id then "
                                   "also hashes the mask, and hparams.json records its path and sha256 "
                                   "under `mask`.")
    _add_experiment_args(p)
    p.add_argument("--mask", default=None, metavar="MASK",
                   help="train this mask instead of the dense network: a stored level folder "
                        "(OUT/<run_id>/level_003) or its masks.msgpack (members.json beside it names each "
                        "member's arm and seed). Each seed takes the mask of the same seed; a seed without "
                        "one is an error unless the arm has a single member, which is then shared by every "
                        "seed. A file without members.json must hold one mask (shared by every seed). The "
                        "mask must match the model's layers and shapes exactly")
    p.add_argument("--mask-arm", default=None, metavar="ARM",
                   help="with --mask: the arm whose masks are used (ticket, reinit, random_prune, shuffle; "
                        "default: ticket)")

    p = sub.add_parser("lottery", help="iterative magnitude pruning with rewinding and controls",
                       description="Run IMP: level 0 trains dense; each level prunes prune.rate of the "
                                   "remaining weights by magnitude, rewinds and retrains every arm x seed "
                                   "as one population. Rerunning resumes at the first incomplete level; a "
                                   "finished run does no training.")
    _add_experiment_args(p)

    p = sub.add_parser("sweep", help="run the grid of an experiment's [sweep] table",
                       description="Expand the [sweep] table of an experiment file (dotted settings -> "
                                   "lists of values) into its grid of runs and run every run not yet "
                                   "finished into OUT, locally or on a Ray cluster. Several sweep "
                                   "processes may share one store: each run is computed once.")
    _add_experiment_args(p)
    p.add_argument("--dry-run", action="store_true", help="list the runs and their status; train nothing")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this machine (--workers processes); ray: one Ray task per group of runs")
    p.add_argument("--workers", type=int, default=1,
                   help="local executor: groups of runs trained in parallel processes (default 1)")
    p.add_argument("--group", type=int, default=8, metavar="N",
                   help="train up to N runs that share data, model, training and rewinding (they differ "
                        "in seeds, arms or pruning settings) as one population, level by level "
                        "(default 8; 1 trains every run alone)")
    p.add_argument("--address", default=None,
                   help="ray executor: cluster address ('auto' or HOST:PORT; default: start a local Ray)")
    p.add_argument("--wandb-sweep", metavar="YAML", default=None,
                   help="write the grid as a W&B sweep config (program: lth) to YAML and exit")

    p = sub.add_parser("report", help="figures and tables from a results folder",
                       description="Turn a results folder into figures (PDF + PNG: accuracy and early-stop "
                                   "step vs weights remaining, learning curves) and tables (summary.csv, "
                                   ".tex, .md: one row per run x arm x level), with a README.md listing them.")
    p.add_argument("root", help="results folder (store root or one run folder)")
    p.add_argument("--out", default="figures", help="folder for figures and tables (default: ./figures)")

    p = sub.add_parser("sparsity", help="per-layer sparsity report of a run",
                       description="Per layer and in total: shape, count, non-zeros (kept by the mask) and "
                                   "density of weights and biases, for one level of a run (from the store).")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    p.add_argument("--level", type=int, default=None, help="IMP level (default: the last completed)")
    p.add_argument("--arm", default="ticket", help="arm to report (default: ticket)")
    p.add_argument("--seed", type=int, default=None, help="seed to report (default: the first)")

    p = sub.add_parser("sensitivity", help="prune each layer alone to each density and evaluate",
                       description="Layer-wise sensitivity: prune each prunable layer of a level's trained "
                                   "ticket alone, by magnitude, to each density (no retraining), evaluate "
                                   "on val and test, write level_L/sensitivity.parquet and a figure.")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    p.add_argument("--level", type=int, default=0, help="IMP level whose ticket is analysed (default 0)")
    p.add_argument("--densities", default="0.9,0.7,0.5,0.3,0.2,0.1,0.05",
                   help="comma-separated densities to prune each layer to (default 0.9,...,0.05)")
    p.add_argument("--out", default=None, help="folder for the figure (default: the level folder)")
    p.add_argument("--to-rates", type=float, default=None, metavar="TOL",
                   help="print per-layer prune.rates keeping each layer's val accuracy drop <= TOL "
                        "(a fraction, e.g. 0.01) after the run's prune.levels levels")

    p = sub.add_parser("compact", help="turn a structurally pruned network into a smaller dense one",
                       description="Build the physically smaller dense network of a level's structurally "
                                   "pruned ticket (prune.granularity = neuron or filter), check that its "
                                   "outputs equal the masked network's, and report parameter counts and "
                                   "measured inference latency of masked vs compact on the same batch.")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    p.add_argument("--level", type=int, required=True, help="IMP level to compact")
    p.add_argument("--batch", type=int, default=1000, help="test examples in the timed batch (default 1000)")

    p = sub.add_parser("speed", help="measured inference latency of each level's ticket in every format",
                       description="Time each level's ticket in every format that applies: dense with the mask "
                                   "(baseline), BCOO (jax.experimental.sparse), scipy CSR (CPU), the compact "
                                   "network (neuron/filter tickets), the int8 integer program, N:M (n:m "
                                   "tickets). Outputs are checked equal to the dense masked network first; "
                                   "latency is the best of several timed repeats after warm-up. Rows go to "
                                   "level_NNN/speed.parquet (analysis.load_speed; figures in `lth report`).")
    p.add_argument("run_dir", help="a run folder OUT/<run_id>")
    p.add_argument("--levels", default=None, help="comma-separated levels (default: every complete level)")
    p.add_argument("--batch", default="1,256", help="comma-separated batch sizes (default 1,256)")
    p.add_argument("--formats", default=None,
                   help="comma-separated formats (default: all that apply): dense,bcoo,csr,compact,int8,nm")
    p.add_argument("--member", type=int, default=0, help="population member of each level (default 0: the "
                   "first seed's ticket)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats; the best is kept (default 7)")
    p.add_argument("--min-time", type=float, default=0.02,
                   help="seconds one timed repeat lasts at least (calls per repeat grow to reach it)")
    p.add_argument("--max-call", type=float, default=2.0,
                   help="a format whose one call takes longer than this many seconds is timed once")

    from .quant_cmd import add_parsers as _add_quant_parsers
    _add_quant_parsers(sub)

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
    from .pipeline import run_experiment

    cfg = load_experiment(args.experiment, args.overrides + args.settings)
    mask, mask_arm = getattr(args, "mask", None), getattr(args, "mask_arm", None)
    if mask_arm is not None and mask is None:
        return _error("--mask-arm needs --mask (the mask file or stored level to train)")
    if mask is not None:
        from .lottery.masked import train_masked
        t0 = time.time()
        store = train_masked(cfg, args.out, mask, mask_arm or "ticket",
                             progress=not args.no_progress and cfg.log.progress)
        _print_summary(store.path, time.time() - t0)
        return 0
    if train_only:
        cfg = cfg.replace(prune=dataclasses.replace(cfg.prune, levels=0), arms=("ticket",), quant=None)
    t0 = time.time()
    log = None if args.no_progress else (lambda msg: print(f"quant: {msg}", file=sys.stderr, flush=True))
    store = run_experiment(cfg, args.out, progress=not args.no_progress and cfg.log.progress, log=log)
    _print_summary(store.path, time.time() - t0)
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import expand, run_sweep, status_of, wandb_sweep_config

    if args.workers < 1:
        return _error(f"--workers {args.workers} is not allowed; expected an integer >= 1")
    if args.group < 1:
        return _error(f"--group {args.group} is not allowed; expected an integer >= 1 (1: no grouping)")
    if args.wandb_sweep and Path(args.wandb_sweep).is_dir():
        return _error(f"--wandb-sweep {args.wandb_sweep} is a folder; give the YAML file to write")
    if args.executor == "ray" and not args.dry_run and not args.wandb_sweep:
        try:
            import ray  # noqa: F401
        except ImportError:
            return _error('--executor ray needs Ray, which is not installed: pip install "lth[ray]"')
    points = expand(args.experiment, args.overrides + args.settings)
    if args.wandb_sweep:
        import yaml
        from .store import atomic_write_text
        atomic_write_text(args.wandb_sweep, yaml.safe_dump(wandb_sweep_config(args.experiment, points, args.out),
                                                           sort_keys=False))
        print(f"wrote W&B sweep config for {len(points)} runs to {args.wandb_sweep} "
              f"(wandb sweep {args.wandb_sweep}; then wandb agent ...)")
        return 0
    if args.dry_run:
        from .sweep import groups_of
        groups = groups_of(points, args.group)
        group_of = {i: g for g, idx in enumerate(groups) for i in idx}
        for i, (p, status) in enumerate(status_of(points, args.out)):
            print(f"{p.run_id}  group {group_of[i]:<3d} {status:<22} {p.label}")
        print(f"{len(points)} runs in {len(groups)} population groups")
        return 0
    from .store import prepare_root
    prepare_root(args.out)
    with _SweepBar(points, args.out, enabled=not args.no_progress) as bar:
        outcomes = run_sweep(points, args.out, executor=args.executor, workers=args.workers,
                             address=args.address, group=args.group, on_done=bar.run_done)
    # A run busy in another process is waited for (then found complete, or trained here if that
    # process died), so the sweep exits only when every run of the grid is finished.
    busy = [i for i, o in enumerate(outcomes) if o.status == "busy"]
    while busy:
        _wait_for_runs([points[i] for i in busy], args.out)
        again = run_sweep([points[i] for i in busy], args.out, executor=args.executor, workers=args.workers,
                          address=args.address, group=args.group)
        for i, o in zip(busy, again):
            o.message = o.message or "waited for another process"
            outcomes[i] = o
        busy = [i for i in busy if outcomes[i].status == "busy"]
    print(f"{'run_id':<13} {'status':<9} {'wall_s':>7}  settings")
    for o in outcomes:
        print(f"{o.run_id:<13} {o.status:<9} {o.wall_s:7.1f}  {o.label}" + (f"  [{o.message}]" if o.message else ""))
    failed = [o for o in outcomes if o.status == "failed"]
    print(f"{len(outcomes)} runs: " + ", ".join(f"{s} {sum(o.status == s for o in outcomes)}"
                                                 for s in ("trained", "quantized", "complete", "busy", "failed")))
    return 1 if failed else 0


WAIT_POLL_S = 1.0
WAIT_REPORT_S = 30.0


def _wait_for_runs(points, out) -> None:
    """Block until no other process holds the lock of any of ``points``; a progress line on stderr
    at the start and every WAIT_REPORT_S seconds (run, owner, levels complete)."""
    from .store import RunStore

    stores = [(RunStore(out, p.run_id), p.cfg.prune.levels) for p in points]
    t0, last = time.time(), None
    while True:
        owners = [(s, n, s.busy_owner()) for s, n in stores]
        owners = [(s, n, o) for s, n, o in owners if o is not None]
        if not owners:
            return
        if last is None or time.time() - last >= WAIT_REPORT_S:
            last = time.time()
            what = "; ".join(f"{s.run_id} ({o}, {sum(s.is_complete(L) for L in range(n + 1))}/{n + 1} levels)"
                             for s, n, o in owners)
            print(f"lth sweep: waiting {last - t0:.0f} s for {len(owners)} run(s) busy in another process: {what}",
                  file=sys.stderr, flush=True)
        time.sleep(WAIT_POLL_S)


class _SweepBar:
    """One bar over all levels of all runs, fed by polling the shared store (works for any executor)."""

    def __init__(self, points, out, enabled: bool):
        from .store import RunStore
        self.stores = [(RunStore(out, p.run_id), p.cfg.prune.levels) for p in points]
        self.total = sum(levels + 1 for _, levels in self.stores)
        self.enabled, self.runs_done, self.n_runs = enabled, 0, len(points)

    def _count(self) -> int:
        return sum(s.is_complete(level) for s, levels in self.stores for level in range(levels + 1)
                   if (s.level_dir(level) / "COMPLETE").exists())

    def __enter__(self):
        if not self.enabled:
            return self
        import threading
        from tqdm.auto import tqdm
        self.bar = tqdm(total=self.total, desc="sweep", unit="level", file=sys.stderr, dynamic_ncols=True)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(1.0):
            self._refresh()

    def _refresh(self):
        n = self._count()
        self.bar.update(n - self.bar.n)
        self.bar.set_postfix(runs=f"{self.runs_done}/{self.n_runs}")

    def run_done(self, outcome, done: int, total: int) -> None:
        self.runs_done = done

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self._refresh()
            self.bar.close()


def _cmd_sparsity(args) -> int:
    from analysis import load_sparsity

    table = load_sparsity(args.run_dir)
    if table.empty:
        return _error(f"{args.run_dir}: no completed level with a sparsity report (is it a run folder?)")
    level = int(table["level"].max()) if args.level is None else args.level
    t = table[(table["level"] == level) & (table["arm"] == args.arm)]
    if t.empty:
        return _error(f"{args.run_dir}: no {args.arm!r} members at level {level}; levels: "
                      f"{_ints(table['level'])}, arms: {sorted(map(str, table['arm'].unique()))}")
    seed = int(t["seed"].min()) if args.seed is None else args.seed
    if seed not in set(t["seed"]):
        return _error(f"{args.run_dir}: level {level} has no {args.arm!r} member of seed {seed}; seeds: "
                      f"{_ints(t['seed'])}")
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


def _ints(values) -> list[int]:
    """Sorted distinct values as plain ints (numpy scalars print as np.int64(0))."""
    return sorted({int(v) for v in values})


def _cmd_sensitivity(args) -> int:
    from .config import ConfigError
    from .prune.sensitivity import load_run_config, rates_for, sensitivity
    from .store import check_writable

    try:
        densities = [float(d) for d in args.densities.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--densities {args.densities!r}: expected comma-separated numbers") from None
    level_dir = Path(args.run_dir) / f"level_{args.level:03d}"
    out = Path(args.out) if args.out else level_dir
    if level_dir.is_dir():  # both get files: fail now, not after the computation
        check_writable(level_dir)
    if out.exists() and not out.is_dir():
        return _error(f"--out {out} exists and is a file; choose a folder")
    if out.is_dir():
        check_writable(out)
    table = sensitivity(args.run_dir, args.level, densities)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt
    from analysis.figures import sensitivity_curves
    fig = sensitivity_curves(table)
    for ext in ("pdf", "png"):
        fig.savefig(out / f"sensitivity.{ext}", dpi=200)
    plt.close(fig)
    test = table[table["split"] == "test"].pivot(index="layer", columns="density", values="accuracy")
    print(test.to_string(float_format=lambda v: f"{v:.4f}"))
    print(f"table: {Path(args.run_dir) / f'level_{args.level:03d}' / 'sensitivity.parquet'}; "
          f"figure: {out / 'sensitivity.pdf'}")
    if args.to_rates is not None:
        levels = load_run_config(args.run_dir).prune.levels
        rates = rates_for(table, args.to_rates, levels)
        inline = ", ".join(f'"{k}" = {v}' for k, v in rates.items())
        print(f"# per-layer rates for {levels} levels, val drop <= {args.to_rates}:")
        print(f"--set 'prune.rates={{{inline}}}'")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    from .config import ConfigError
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 0:
        raise ConfigError(f"{what} {text!r}: expected comma-separated integers >= 0")
    return values


def _cmd_speed(args) -> int:
    from analysis.speed import crossover
    from .speed import machine_info, measure_run

    batches = _int_list(args.batch, "--batch")
    if min(batches) < 1:
        return _error(f"--batch {args.batch!r}: batch sizes must be >= 1")
    if args.repeats < 1:
        return _error(f"--repeats {args.repeats} is not allowed; expected an integer >= 1")
    levels = _int_list(args.levels, "--levels") if args.levels else None
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    m = machine_info()
    print(f"machine: {m['backend']} {m['device']} ({m['cpu']}, {m['cpu_cores']} cores); python {m['python']}, "
          f"jax {m['jax']}, jaxlib {m['jaxlib']}, numpy {m['numpy']}, scipy {m['scipy']}")
    df = measure_run(args.run_dir, levels, batches, formats, member=args.member, log=print,
                     repeats=args.repeats, min_time=args.min_time, max_call_s=args.max_call)
    t = df[["level", "density", "format", "batch", "latency_s", "throughput", "speedup", "bytes", "max_abs_diff"]]
    t = t.assign(density=100 * t["density"], latency_ms=1e3 * t["latency_s"]).drop(columns="latency_s")
    print(t.sort_values(["batch", "level", "format"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    c = crossover(df)
    if not c.empty:
        print("crossover: highest weights remaining (%) from which on each format beats dense")
        for r in c.itertuples():
            cross = "never faster" if r.crossover_density != r.crossover_density else f"{100 * r.crossover_density:.3g}%"
            print(f"  {r.format:>8} batch {r.batch:<5} {cross:>13}  (best {r.best_speedup:.2f}x at "
                  f"{100 * r.best_at_density:.3g}%)")
    print(f"rows: {Path(args.run_dir)}/level_NNN/speed.parquet")
    return 0


def _print_summary(run_dir: Path, wall_s: float) -> None:
    from analysis import load_runs, final_accuracy

    df = load_runs(run_dir.parent, run_ids=[run_dir.name])
    table = final_accuracy(df)
    print(f"run {run_dir.name}: {run_dir}  ({wall_s:.1f} s)")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    if "diverged_step" in df:
        from .train import DIVERGENCE_FACTOR
        bad = df[df["diverged_step"] >= 0].drop_duplicates(["level", "arm", "seed"])
        for r in bad.itertuples():
            print(f"diverged: level {int(r.level)} {r.arm} seed {int(r.seed)} at step {int(r.diverged_step)} "
                  f"(training loss non-finite or above {DIVERGENCE_FACTOR:g}x its first-step value)")


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
        if args.command == "sweep":
            return _cmd_sweep(args)
        if args.command == "report":
            from analysis.report import write_report
            if Path(args.out).exists() and not Path(args.out).is_dir():
                return _error(f"--out {args.out} exists and is a file; choose a folder for the figures")
            try:
                made = write_report(args.root, args.out)
            except ValueError as e:  # NotAStoreError, or a store with no completed level
                return _error(str(e))
            print(f"wrote {len(made)} figures and summary tables to {args.out}/ (see {args.out}/README.md)")
            return 0
        if args.command == "sparsity":
            return _cmd_sparsity(args)
        if args.command == "sensitivity":
            return _cmd_sensitivity(args)
        if args.command == "compact":
            from .prune.structured import compact_run
            try:
                r = compact_run(args.run_dir, args.level, batch=args.batch)
            except ValueError as e:
                return _error(str(e))
            for k, v in r.items():
                print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
            print(f"{'speedup':>20}: {r['latency_masked_ms'] / r['latency_compact_ms']:.2f}x")
            return 0
        if args.command == "speed":
            from .speed import SpeedCheckError
            try:
                return _cmd_speed(args)
            except SpeedCheckError as e:
                return _error(str(e))
        if args.command in ("quantize", "export", "eval-export"):
            from .quant_cmd import run as run_quant
            return run_quant(args)
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
    except OSError as e:  # a full disk, a read-only folder, a path that is a folder: name it, no traceback
        where = f"{e.filename}: " if e.filename else ""
        return _error(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print("lth: interrupted; completed levels are kept and a rerun resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

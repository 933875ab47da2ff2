"""``lth sweep``: run the grid of an experiment's [sweep] table, locally or on Ray."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .common import Command, add_experiment_args, error


def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run the grid of an experiment's [sweep] table",
                       description="Expand the [sweep] table of an experiment file (dotted settings -> "
                                   "lists of values) into its grid of runs and run every run not yet "
                                   "finished into OUT, locally or on a Ray cluster. Several sweep "
                                   "processes may share one store: each run is computed once.")
    add_experiment_args(p)
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


def run_sweep_command(args) -> int:
    from ..sweep import expand, run_sweep, status_of, wandb_sweep_config

    if args.workers < 1:
        return error(f"--workers {args.workers} is not allowed; expected an integer >= 1")
    if args.group < 1:
        return error(f"--group {args.group} is not allowed; expected an integer >= 1 (1: no grouping)")
    if args.wandb_sweep and Path(args.wandb_sweep).is_dir():
        return error(f"--wandb-sweep {args.wandb_sweep} is a folder; give the YAML file to write")
    if args.executor == "ray" and not args.dry_run and not args.wandb_sweep:
        try:
            import ray  # noqa: F401
        except ImportError:
            return error('--executor ray needs Ray, which is not installed: pip install "lth[ray]"')
    points = expand(args.experiment, args.overrides + args.settings)
    if args.wandb_sweep:
        import yaml
        from ..store import atomic_write_text
        atomic_write_text(args.wandb_sweep, yaml.safe_dump(wandb_sweep_config(args.experiment, points, args.out),
                                                           sort_keys=False))
        print(f"wrote W&B sweep config for {len(points)} runs to {args.wandb_sweep} "
              f"(wandb sweep {args.wandb_sweep}; then wandb agent ...)")
        return 0
    if args.dry_run:
        from ..sweep import groups_of
        groups = groups_of(points, args.group)
        group_of = {i: g for g, idx in enumerate(groups) for i in idx}
        for i, (p, status) in enumerate(status_of(points, args.out)):
            print(f"{p.run_id}  group {group_of[i]:<3d} {status:<22} {p.label}")
        print(f"{len(points)} runs in {len(groups)} population groups")
        return 0
    from ..store import prepare_root
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
    from ..compiles import CompileCount
    args.worker_compiles = [CompileCount.from_json(o.compiles) for o in outcomes if o.compiles]
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
    from ..store import RunStore

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
    """One bar over all levels of all runs, fed by polling the shared store (works for any executor).

    Its description names the stage each busy run is in (:func:`lth.sweep.run_stage`: train level L,
    stability, quant cells). The rate, and so the ETA, leaves out the levels found done at the start
    and those completed until the first pruned level is (level 0 compiles the dense population's
    programs, the first pruned level the pruned population's, and each the quant stage's): until then
    the ETA is unknown."""

    POLL_S = 2.0

    def __init__(self, points, out, enabled: bool):
        from ..store import RunStore
        self.points, self.out = points, out
        self.stores = [(RunStore(out, p.run_id), p.cfg.prune.levels) for p in points]
        self.total = sum(levels + 1 for _, levels in self.stores)
        self.enabled, self.runs_done, self.n_runs = enabled, 0, len(points)
        self.complete: set[tuple[int, int]] = set()  # (point, level) seen complete: not hashed again
        self.frontier = [0] * len(points)  # per point: the levels before it have nothing left (run_stage)
        self.warm = False  # a pruned level completed while we watched: compiling is behind us
        self.started = False  # the first count (levels done before the sweep) is behind us
        self.compiled = False

    def _count(self) -> int:
        for i, (s, levels) in enumerate(self.stores):
            for level in range(levels + 1):
                if (i, level) not in self.complete and (s.level_dir(level) / "COMPLETE").exists() \
                        and s.is_complete(level):
                    self.complete.add((i, level))
                    if self.started and level >= min(1, levels):  # a pruned level (or a dense-only run)
                        self.compiled = True
        self.started = True
        return len(self.complete)

    def _stages(self) -> list[str]:
        from ..sweep import run_stage
        out = []
        for i, ((s, _), p) in enumerate(zip(self.stores, self.points)):
            if s.busy_owner() is None:
                continue
            self.frontier[i], stage = run_stage(p.cfg, self.out, self.frontier[i])
            if stage is not None:
                out.append(stage)
        return out

    def __enter__(self):
        if not self.enabled:
            return self
        import threading
        from tqdm.auto import tqdm
        done = self._count()  # resumed levels: not part of the rate
        self.bar = tqdm(total=self.total, initial=done, desc="sweep", unit="level", file=sys.stderr,
                        dynamic_ncols=True, smoothing=0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(self.POLL_S):
            self._refresh()

    def _refresh(self):
        from ..sweep import stages_text
        n = self._count()
        if not self.warm:  # no rate yet (tqdm shows ?); once compiled, the clock restarts from here
            self.warm = self.compiled
            self.bar.n = self.bar.initial = self.bar.last_print_n = n
            if self.warm:
                self.bar.start_t = self.bar.last_print_t = self.bar._time()
        elif n > self.bar.n:
            self.bar.update(n - self.bar.n)
        stages = stages_text(self._stages())
        self.bar.set_description(f"sweep: {stages}" if stages else "sweep", refresh=False)
        self.bar.set_postfix(runs=f"{self.runs_done}/{self.n_runs}",
                             **({} if self.warm else {"eta": "after 1st level"}))

    def run_done(self, outcome, done: int, total: int) -> None:
        self.runs_done = done

    def __exit__(self, *exc):
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self._refresh()
            self.bar.close()


COMMANDS = [Command("sweep", add_sweep, run_sweep_command)]

"""End-to-end wall time of an IMP experiment, population-batched against one network at a time.

The experiment is ``experiments/lenet300_fmnist.toml`` (LeNet-300-100 on Fashion-MNIST, Adam 1.2e-3,
batch 60) shortened to 5 levels x 2 epochs, 2 seeds and the arms ticket, reinit and random_prune,
with W&B disabled and no progress bar. Level 0 trains the 2 dense networks; levels 1..5 each train
3 arms x 2 seeds = 6 networks: 32 network-trainings of 2 epochs (1,832 steps) each, plus an
evaluation on val (5,000) and test (10,000) every 1,000 steps and at the end of every training.

Three ways to run exactly that, all through the library, each into its own fresh store:

- **batched**: ``lth.lottery.run_lottery(cfg, tmp, progress=False)``: one run; every level is one
  population (K = 2 at level 0, K = 6 after), trained by one compiled program per segment
  (``train.member_batch`` auto: on CPU its members run one after another inside that program, on
  GPU they are vmapped).
- **population of 1**: the same run (same ``cfg``, members, masks, inits, data orders, evaluation
  steps and stored files), but the engine trains every member of a level on its own: the level's
  population state is split into K single-member states, each goes through ``Engine.run`` with K = 1,
  and the results are concatenated back. This is what "no batching" means: identical work,
  identical results up to float rounding, only the population axis is gone. (Running each
  (arm, seed) as its own experiment is not possible: ``arms`` must start with "ticket", and a
  control's mask comes from that run's ticket.)
- **per seed** (``--per-seed``, for information): each seed as its own experiment (``seeds=[s]``,
  the same 3 arms) through ``run_lottery``: what a user without populations across seeds would do;
  it still batches the 3 arms of one seed (K = 1 at level 0, K = 3 after).

Every wall time includes everything a user waits for: data loading, compiling, training,
evaluation, pruning and store writes. The final test accuracies of the batched and the
population-of-1 runs are compared as a check that both did the same work.
``speedup = population-of-1 wall / batched wall``. Each variant's line also says how much of its
wall time was compiling (jax.monitoring compile events) and evaluating (``Engine.evaluate``,
wrapped with a timer for this benchmark).

    python benchmarks/lottery_wall.py [--levels 5] [--epochs 2] [--per-seed] [--repeats 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "lenet300_fmnist.toml"
ARMS = '["ticket","reinit","random_prune"]'


def log(*a):
    print(*a, flush=True)


class OneAtATime:
    """Wraps an ``lth.train.Engine`` so ``run`` trains each member of the population alone (K = 1)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, state, data_seeds, *, start=0, stop=None, snapshot_steps=(), progress=None):
        import jax
        import jax.numpy as jnp

        from lth.train import TrainResult

        seeds = [int(s) for s in data_seeds]
        parts, records, snaps, diverged = [], [], [], {}
        for k, seed in enumerate(seeds):
            one = jax.tree.map(lambda a: a[k:k + 1], state)
            res = self._engine.run(one, [seed], start=start, stop=stop, snapshot_steps=snapshot_steps,
                                   progress=None)
            parts.append(res.state)
            records += [{**r, "member": k} for r in res.records]
            snaps.append(res.snapshots)
            for _, v in res.diverged.items():
                diverged[k] = v
        cat = lambda *xs: jnp.concatenate(xs) if isinstance(xs[0], jax.Array) else np.concatenate(xs)  # noqa: E731
        new_state = jax.tree.map(cat, *parts)
        snapshots = {s: jax.tree.map(cat, *[sn[s] for sn in snaps]) for s in snaps[0]}
        return TrainResult(state=new_state, records=records, snapshots=snapshots, diverged=diverged)


def config(levels: int, epochs: int, seeds: list[int]):
    from lth.config import load_experiment

    return load_experiment(EXPERIMENT, [f"prune.levels={levels}", f"train.epochs={epochs}",
                                        f"seeds={seeds}", f"arms={ARMS}", 'log.wandb="disabled"',
                                        "log.progress=false"])


def final_test_acc(store_path: Path) -> dict:
    """(level, arm, seed) -> final test accuracy, read from the store."""
    import pandas as pd

    out = {}
    for f in sorted(store_path.glob("level_*/metrics.parquet")):
        df = pd.read_parquet(f)
        df = df[df.split == "test"]
        last = df[df.step == df.step.max()]
        for r in last.itertuples():
            out[(int(r.level), r.arm, int(r.seed))] = float(r.accuracy)
    return out


class Breakdown:
    """Where a variant's wall time went: compiling (jax.monitoring events) and evaluating (a timing
    wrapper around ``Engine.evaluate``, installed for the benchmark only)."""

    def __init__(self):
        import jax.monitoring

        from lth import train

        self.compile_s, self.compiles, self.eval_s = 0.0, 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._event)
        original = train.Engine.evaluate

        def evaluate(engine, state):
            t0 = time.perf_counter()
            try:
                return original(engine, state)
            finally:
                self.eval_s += time.perf_counter() - t0

        train.Engine.evaluate = evaluate

    def _event(self, name, secs, **_):
        if name.startswith("/jax/core/compile/"):
            self.compile_s += secs
            self.compiles += name.endswith("backend_compile_duration")

    def snapshot(self):
        return self.compile_s, self.compiles, self.eval_s


def run_batched(levels, epochs, seeds):
    from lth.lottery import run_lottery

    with tempfile.TemporaryDirectory(prefix="lth_wall_") as tmp:
        t0 = time.perf_counter()
        store = run_lottery(config(levels, epochs, seeds), tmp, progress=False)
        wall = time.perf_counter() - t0
        return wall, final_test_acc(Path(store.path))


def run_one_at_a_time(levels, epochs, seeds):
    from lth.lottery import Lottery

    with tempfile.TemporaryDirectory(prefix="lth_wall_") as tmp:
        t0 = time.perf_counter()
        lottery = Lottery(config(levels, epochs, seeds), tmp, progress=False)
        lottery.engine = OneAtATime(lottery.engine)
        store = lottery.run(None)  # what run_lottery does with W&B disabled
        wall = time.perf_counter() - t0
        return wall, final_test_acc(Path(store.path))


def run_per_seed(levels, epochs, seeds):
    from lth.lottery import run_lottery

    wall, accs = 0.0, {}
    for s in seeds:
        with tempfile.TemporaryDirectory(prefix="lth_wall_") as tmp:
            t0 = time.perf_counter()
            store = run_lottery(config(levels, epochs, [s]), tmp, progress=False)
            wall += time.perf_counter() - t0
            accs.update(final_test_acc(Path(store.path)))
    return wall, accs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--levels", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--per-seed", action="store_true", help="also time each seed as its own experiment")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each variant this many times, interleaved, and keep the best (shared machine)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    import jax

    from lth.lottery import Lottery  # noqa: F401  (fail early if the library is broken)

    cfg = config(args.levels, args.epochs, seeds)
    n_members = len(seeds) + args.levels * len(seeds) * len(cfg.arms)
    log(f"experiment: {EXPERIMENT.relative_to(ROOT)} with prune.levels={args.levels} train.epochs={args.epochs} "
        f"seeds={seeds} arms={list(cfg.arms)}; {n_members} network-trainings; run id {cfg.run_id}")
    log(f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} device(s))")

    variants = [("batched", run_batched), ("population of 1", run_one_at_a_time)]
    if args.per_seed:
        variants.append(("per seed", run_per_seed))
    best: dict[str, float] = {}
    accs: dict[str, dict] = {}
    bd = Breakdown()
    for r in range(args.repeats):
        for name, fn in variants:
            c0, n0, e0 = bd.snapshot()
            wall, acc = fn(args.levels, args.epochs, seeds)
            c1, n1, e1 = bd.snapshot()
            log(f"  round {r + 1}: {name:16s} {wall:7.1f} s  (compiling {c1 - c0:5.1f} s in {n1 - n0} programs, "
                f"evaluating {e1 - e0:5.1f} s, training and the rest {wall - (c1 - c0) - (e1 - e0):6.1f} s)")
            best[name] = min(best.get(name, float("inf")), wall)
            accs[name] = acc

    ref = accs["batched"]
    for name, _ in variants[1:]:
        keys = sorted(set(ref) & set(accs[name]))
        diff = [abs(ref[k] - accs[name][k]) for k in keys]
        log(f"check: {name} vs batched final test accuracy over {len(keys)} (level, arm, seed): "
            f"mean |diff| {np.mean(diff):.4f}, max {np.max(diff):.4f}; "
            f"mean acc {np.mean([ref[k] for k in keys]):.4f} vs {np.mean([accs[name][k] for k in keys]):.4f}")
    log(f"wall_batched_s: {best['batched']:.1f}")
    log(f"wall_population_of_1_s: {best['population of 1']:.1f}")
    if args.per_seed:
        log(f"wall_per_seed_s: {best['per seed']:.1f}")
    log(f"speedup: {best['population of 1'] / best['batched']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

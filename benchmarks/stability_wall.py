"""Wall time of one IMP level with stability copies vs without, and of the path evaluation.

Trains the experiment's dense level once into a temporary store (with copies), then times the
training of level 1 (``Lottery.run_plan``: the compiled population program) with and without the
``[stability]`` copies, alternating, ``--repeats`` times each after one untimed run that compiles;
prints the best time of each, their ratio, the ratio of member counts, and the time of the path
evaluation of the level's pairs (one compiled program, timed after a compiling call):

    python benchmarks/stability_wall.py [--experiment experiments/stability_lenet_fmnist.toml]
        [--repeats 3] [--set KEY=VALUE]

The copies should cost about their share of members (a level with twice the members takes about
twice the time on CPU, where members run one after another), not a separate run.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import jax
import numpy as np

from lth.config import load_experiment
from lth.lottery import Lottery
from lth.lottery.runner import Member, read_members
from lth.lottery.stability import PathEvaluator
from lth.store import load_tree


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="experiments/stability_lenet_fmnist.toml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg = load_experiment(args.experiment, ["prune.levels=1", "log.wandb=disabled", "log.progress=false",
                                            "stability.enabled=true", *args.overrides])
    off = cfg.replace(stability=dataclasses.replace(cfg.stability, enabled=False))
    with tempfile.TemporaryDirectory() as out:
        lot = Lottery(cfg, out, progress=False)
        bare = Lottery(off, out, progress=False, share=lot)  # the same store, data and compiled engine
        init = lot.init_weights()
        lot.train_level(0, init, None)
        times: dict[str, list[float]] = {"with copies": [], "without": []}
        plans = {"with copies": lot.prepare_level(1, init), "without": bare.prepare_level(1, init)}
        for rep in range(args.repeats + 1):
            for name, who in (("with copies", lot), ("without", bare)):
                plan = plans[name]
                state = who.initial_state(1, plan)
                t0 = time.time()
                result, _, _ = who.run_plan(1, plan, state, None)
                jax.block_until_ready(result.state.params)
                if rep:  # the first round compiles
                    times[name].append(time.time() - t0)
        k_with, k_without = len(plans["with copies"].members), len(plans["without"].members)
        best = {k: min(v) for k, v in times.items()}
        print(f"level 1 of {cfg.name}: {lot.engine.num_steps} steps; best of {args.repeats} (loaded machine)")
        print(f"  with copies: {k_with} members, {best['with copies']:.2f} s  (all: "
              + ", ".join(f"{t:.2f}" for t in times["with copies"]) + ")")
        print(f"  without:     {k_without} members, {best['without']:.2f} s  (all: "
              + ", ".join(f"{t:.2f}" for t in times["without"]) + ")")
        print(f"  time ratio {best['with copies'] / best['without']:.2f}, member ratio {k_with / k_without:.2f}")
        # the path evaluation of the level-0 pairs (the stage's program), after one compiling call
        d = lot.store.level_dir(0)
        members = read_members(d)
        final, masks = load_tree(d / "final.msgpack"), load_tree(d / "masks.msgpack")
        i0 = [members.index(Member(m.arm, m.seed)) for m in members if m.copy]
        i1 = [k for k, m in enumerate(members) if m.copy]
        take = lambda t, i: jax.tree.map(lambda a: np.asarray(a)[i], t)  # noqa: E731
        ev = PathEvaluator(lot.model, lot.data, cfg, cfg.stability.points, cfg.stability.bn_batches)
        mask = jax.tree.map(lambda a: a.astype(bool), take(masks, i0))
        bs = final.get("batch_stats", {}) or {}
        ev(take(final["params"], i0), take(final["params"], i1), take(bs, i0), take(bs, i1), mask)
        t0 = time.time()
        ev(take(final["params"], i0), take(final["params"], i1), take(bs, i0), take(bs, i1), mask)
        print(f"  path evaluation: {len(i0)} pairs x {cfg.stability.points} points on {len(lot.data.x_test)} test "
              f"examples: {time.time() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

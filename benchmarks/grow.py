"""Growing a run vs recomputing it: wall time of an extension against a fresh run of the final
config, and proof that the stored members are unchanged.

The experiment is ``experiments/quickstart.toml`` (the MNIST-1D MLP 100-100, Adam 2e-3, batch 100;
``--experiment`` for another, e.g. ``experiments/lenet300_fmnist.toml``)
with ``train.steps`` steps per level (default 300), arms ticket and reinit, W&B and the quant stage
off. Two extensions, each into its own fresh store, both through ``lth.lottery.run_lottery``:

1. **levels**: 2 seeds x 3 levels, then the same run asked for 5 levels. Proof: the sha256 of every
   file of levels 0..3 (and of ``init.msgpack``) is the same before and after.
2. **seeds**: 2 seeds x 5 levels, then the same run asked for 3 seeds. Proof: in every level the
   first (stored) members' arrays of ``final.msgpack`` and ``masks.msgpack`` and their metrics
   rows equal those stored before, value for value, and the grown run's new members equal the
   fresh run's (exactly, or the largest difference is printed).

Each extension (of a copy of the stored run) is timed against a fresh run of the final config (its own empty store). Every run
is its own process (as a user's rerun is), and its wall time includes data loading, compiling,
training, evaluation and store writes (not the Python start and imports); the best of
``--repeats`` is printed. JAX's persistent compile cache (see docs/speed.md) is on as usual, so a
program compiled by an earlier run is read, not compiled: the first run pays for most compiling.

    python benchmarks/grow.py [--steps 300] [--repeats 2] [--experiment experiments/lenet300_fmnist.toml]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lth.config import load_experiment  # noqa: E402
from lth.store import RunStore, load_tree  # noqa: E402


EXPERIMENT = ROOT / "experiments" / "quickstart.toml"


def cfg_for(steps: int, levels: int, seeds: list[int]):
    sets = [f"train.steps={steps}", "train.epochs=None", f"train.eval_every={max(steps // 3, 1)}",
            f"prune.levels={levels}", f"seeds={json.dumps(seeds)}", 'arms=["ticket","reinit"]',
            'log.wandb="disabled"', "log.progress=false"]
    cfg = load_experiment(EXPERIMENT, sets)
    return cfg.replace(quant=None)


_CHILD = """
import sys, time
from lth.config import ExperimentConfig
from lth.lottery import run_lottery
cfg = ExperimentConfig.from_json(sys.stdin.read())
t0 = time.perf_counter()
run_lottery(cfg, sys.argv[1], progress=False)
print(time.perf_counter() - t0)
"""


def timed(cfg, out) -> tuple[float, object]:
    """Wall time of ``run_lottery(cfg, out)`` in a fresh process (cold: data loading and compiling
    included, as a user's rerun would see them), and the run's store."""
    r = subprocess.run([sys.executable, "-c", _CHILD, str(out)], input=cfg.to_json(), capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if r.returncode:
        raise SystemExit(r.stderr)
    return float(r.stdout.strip().splitlines()[-1]), RunStore(Path(out), cfg.run_id)


def extend(cfg, stored: Path, repeats: int) -> tuple[float, float, RunStore]:
    """Best of ``repeats`` wall times of growing a copy of the store ``stored`` to ``cfg``, and of a
    fresh run of ``cfg`` (alternating); the store grown last is left in ``stored``."""
    grow, fresh = [], []
    for r in range(repeats):
        copy = stored.with_name(f"{stored.name}_copy{r}")
        shutil.copytree(stored, copy)
        grow.append(timed(cfg, copy)[0])
        fresh.append(timed(cfg, stored.with_name(f"{stored.name}_fresh{r}"))[0])
    shutil.rmtree(stored)
    copy.rename(stored)
    return min(grow), min(fresh), RunStore(stored, cfg.run_id)


def files(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


def members(d: Path):
    return [(m["arm"], m["seed"]) for m in json.loads((d / "members.json").read_text())]


def main() -> int:
    global EXPERIMENT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps per level")
    ap.add_argument("--experiment", default=str(ROOT / "experiments" / "quickstart.toml"),
                    help="experiment file (default quickstart.toml; e.g. experiments/lenet300_fmnist.toml)")
    ap.add_argument("--repeats", type=int, default=2, help="timings of each extension and fresh run (best is shown)")
    args = ap.parse_args()
    EXPERIMENT = Path(args.experiment)
    print(f"{EXPERIMENT.name}, {args.steps} steps per level, arms ticket + reinit (wall times on this machine)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---------------------------------------------------------------- 3 -> 5 levels
        three, five = cfg_for(args.steps, 3, [0, 1]), cfg_for(args.steps, 5, [0, 1])
        assert three.run_id == five.run_id
        t_first, store = timed(three, tmp / "levels")
        before = {L: files(store.level_dir(L)) for L in range(4)}
        init_before = hashlib.sha256((store.path / "init.msgpack").read_bytes()).hexdigest()
        t_grow, t_fresh, store = extend(five, tmp / "levels", args.repeats)
        same = all(files(store.level_dir(L)) == before[L] for L in range(4)) and init_before == hashlib.sha256(
            (store.path / "init.msgpack").read_bytes()).hexdigest()
        print(f"levels 3 -> 5 (2 seeds): first run {t_first:.1f} s; extension {t_grow:.1f} s vs fresh 5-level run "
              f"{t_fresh:.1f} s ({t_grow / t_fresh:.2f}x); levels 0-3 and init.msgpack byte-identical: {same}")

        # ---------------------------------------------------------------- 2 -> 3 seeds
        two, more = cfg_for(args.steps, 5, [0, 1]), cfg_for(args.steps, 5, [0, 1, 2])
        assert two.run_id == more.run_id
        t_first, store = timed(two, tmp / "seeds")
        old = {}
        for L in range(6):
            d = store.level_dir(L)
            old[L] = ({n: flat(load_tree(d / n)) for n in ("final.msgpack", "masks.msgpack")},
                      pd.read_parquet(d / "metrics.parquet"))
        t_grow, t_fresh, store = extend(more, tmp / "seeds", args.repeats)
        fresh = RunStore(tmp / "seeds_fresh0", more.run_id)
        unchanged, worst = True, 0.0
        for L in range(6):
            d, fd = store.level_dir(L), fresh.level_dir(L)
            arrays, rows = old[L]
            for name, tree in arrays.items():
                now, ref = flat(load_tree(d / name)), flat(load_tree(fd / name))
                ma, mb = members(d), members(fd)
                for key, a in tree.items():
                    unchanged &= bool(np.array_equal(now[key][:len(a)], a))
                    for i in range(len(a), len(ma)):  # the new members against the fresh run's
                        x, y = now[key][i], ref[key][mb.index(ma[i])]
                        worst = max(worst, float(np.max(np.abs(x.astype(float) - y.astype(float)), initial=0.0)))
            m = pd.read_parquet(d / "metrics.parquet")
            unchanged &= m.iloc[:len(rows)][list(rows.columns)].equals(rows)
        print(f"seeds 2 -> 3 (5 levels): first run {t_first:.1f} s; extension {t_grow:.1f} s vs fresh 3-seed run "
              f"{t_fresh:.1f} s ({t_grow / t_fresh:.2f}x); old members' arrays and metrics rows identical: "
              f"{unchanged}; new members vs fresh run: max |diff| {worst:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

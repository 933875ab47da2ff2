"""Conv-2 on Fashion-MNIST (28 x 28 x 1) through ``lth lottery``: accuracy and density per level, wall time.

The Conv-2 settings of Frankle & Carbin 2019 (``experiments/conv_cifar10.toml`` with ``model.name =
conv2``: Adam 2e-4, batch 60, prune 10% of conv and 20% of fc weights per level, 10% of the output
layer) on Fashion-MNIST instead of CIFAR-10, shortened to ``--epochs`` (default 1) per level,
``--levels`` (default 5) levels after the dense one, one seed, the arms ticket and random_prune, W&B
off, no progress bar. The command is run as a user would (``python -m lth.cli lottery ...``) into
``--out``; the wall time is the whole command (imports, data loading, compiling, training,
evaluating twice per epoch on val and test, pruning, store writes). Then the store is read back and
one row per (level, arm) is printed: density (fraction of prunable weights remaining), final test
accuracy and test accuracy at the early-stop step (minimum val loss).

    python benchmarks/conv2_fmnist.py [--out /tmp/conv2_fmnist] [--levels 5] [--epochs 1] [--summary-only]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def command(out: str, levels: int, epochs: int) -> list[str]:
    sets = ["data.name=fashion_mnist", "model.name=conv2", "train.lr=2e-4", "train.steps=none",
            f"train.epochs={epochs}", "train.eval_every=458", "seeds=[0]", 'arms=["ticket","random_prune"]',
            f"prune.levels={levels}", "prune.conv_rate=0.1", "prune.rate=0.2", "prune.output_rate=0.1",
            "log.wandb=disabled"]
    return [sys.executable, "-m", "lth.cli", "lottery", str(ROOT / "experiments" / "conv_cifar10.toml"),
            "--out", out, "--no-progress", *[a for s in sets for a in ("--set", s)]]


def summary(out: str) -> pd.DataFrame:
    rows = []
    for run in sorted(Path(out).iterdir()):
        for f in sorted(run.glob("level_*/metrics.parquet")):
            m = pd.read_parquet(f)
            test = m[m.split == "test"]
            for (level, arm), g in test.groupby(["level", "arm"], sort=True):
                final = g[g.step == g.step.max()].iloc[0]
                early = g[g.step == final.early_stop_step]
                rows.append({"level": level, "arm": arm, "density": round(float(final.density), 4),
                             "test_final": round(float(final.accuracy), 4),
                             "test_early_stop": round(float(early.accuracy.iloc[0]), 4) if len(early) else None,
                             "level_wall_s": round(float(final.wall_s), 1)})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/conv2_fmnist")
    p.add_argument("--levels", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--summary-only", action="store_true", help="only read back an existing --out")
    args = p.parse_args(argv)
    if not args.summary_only:
        cmd = command(args.out, args.levels, args.epochs)
        print(" ".join(cmd), flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        print(f"wall time: {time.perf_counter() - t:.0f} s", flush=True)
    print(summary(args.out).to_string(index=False))


if __name__ == "__main__":
    main()

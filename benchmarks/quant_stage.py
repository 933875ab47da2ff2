"""The quant stage batched over a level's members vs one member at a time.

Trains the quickstart experiment's first levels (``--levels``, default 2) into a temporary store,
then runs the quant stage of its ``[quant]`` table on the last level twice per mode (the first run
compiles; the second, timed, reuses the compiled programs) without writing cells:

    python benchmarks/quant_stage.py [--experiment experiments/quickstart.toml] [--levels 2] [--set KEY=VALUE]

Prints the wall time of each mode, the ratio, and checks that both modes give the same accuracies.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from lth.config import load_experiment
from lth.lottery import run_lottery
from lth.quant import quantize_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="experiments/quickstart.toml")
    p.add_argument("--levels", type=int, default=2, help="IMP levels to train first (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="more experiment overrides, e.g. --set train.epochs=1")
    args = p.parse_args(argv)
    cfg = load_experiment(args.experiment, [f"prune.levels={args.levels}", "log.wandb=disabled",
                                            "log.progress=false", *args.overrides])
    qc = cfg.quant
    if qc is None:
        print(f"{args.experiment} has no [quant] table", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        store = run_lottery(cfg, out)
        print(f"trained {args.levels + 1} levels in {time.time() - t0:.1f} s")
        level = args.levels
        times, cold, tables = {}, {}, {}
        for batched in (True, False):
            for attempt in ("compile", "timed"):
                t0 = time.time()
                df = quantize_run(store.path, [level], config=qc, write=False, batched=batched)
                if attempt == "compile":
                    cold[batched] = time.time() - t0
                else:
                    times[batched] = time.time() - t0
                    tables[batched] = df.sort_values(["arm", "seed", "bits", "method"]).reset_index(drop=True)
        members = tables[True][["arm", "seed"]].drop_duplicates().shape[0]
        cells = tables[True]["cell"].nunique()
        diff = np.max(np.abs(tables[True]["accuracy"].to_numpy() - tables[False]["accuracy"].to_numpy()))
        print(f"level {level}: {members} members x {len(tables[True]) // members} settings ({cells} cells)")
        print(f"batched over the population:  {times[True]:7.2f} s  (first call, compiling: {cold[True]:.2f} s)")
        print(f"one member at a time:         {times[False]:7.2f} s  (first call, compiling: {cold[False]:.2f} s)")
        print(f"ratio_batched: {times[False] / times[True]:.2f}")
        print(f"max accuracy difference between the modes: {diff:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sparse from scratch vs the ticket: accuracy and training FLOPs per (level, arm) of a stored run.

Reads a run of ``experiments/dst_lenet_fmnist.toml`` (``lth lottery`` into ``--out``) and prints one row
per (level, arm): density (fraction of prunable weights remaining), final test accuracy and test accuracy
at the early-stop step (minimum val loss), mean and spread over seeds (``_low``/``_high``: min-max below 3
seeds, the 95% t-interval from 3 on; ``spread`` says which), and the training FLOPs of one
member for the level (Evci et al. 2020, App. H: 3 f_S a step, f_S = 2 x non-zero kernel weights per
example for dense layers; RigL pays 2 f_S + f_D at each mask update, :func:`lth.prune.dst.training_flops`),
plus for the ticket the cumulative FLOPs of IMP to find it (every level up to it, the dense one included).
Dense (MLP) layers only: a conv's FLOPs per weight depend on its output size.

Then one row per (level, arm, layer) of static/set/rigl (``ever_active.parquet``): the final density of the
layer and the fraction of its weights active at any step of the level's training, mean over seeds.

    python benchmarks/dst_table.py /tmp/dstruns/<run_id>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd

from analysis.summary import seed_spread
from lth.prune.dst import training_flops, update_steps
from lth.store import load_tree


def forward_flops(mask) -> float:
    """Per-example forward FLOPs of the dense layers: 2 per non-zero kernel weight."""
    return float(sum(2 * np.sum(m["kernel"]) for m in mask.values() if "kernel" in m))


def main(run: Path) -> pd.DataFrame:
    hp = json.loads((run / "hparams.json").read_text())
    steps, batch, pc = hp["num_steps"], hp["train"]["batch_size"], hp["prune"]
    end = int(round(pc.get("dst_end", 0.75) * steps))
    n_updates = len(update_steps(0, steps, delta_t=pc.get("dst_delta_t", 100), end_step=end))
    rows, cumulative, f_dense = [], 0.0, None
    for level in range(pc["levels"] + 1):
        d = run / f"level_{level:03d}"
        if not (d / "COMPLETE").is_file():  # a run still training: the levels done so far
            break
        members = json.loads((d / "members.json").read_text())
        masks = load_tree(d / "masks.msgpack")
        m = pd.read_parquet(d / "metrics.parquet")
        test = m[m.split == "test"]
        for k, mem in enumerate(members):
            mask = jax.tree.map(lambda a: a[k], masks)
            f = forward_flops(mask)
            if level == 0:
                f_dense = f
            rows.append({"level": level, "arm": mem["arm"], "seed": mem["seed"], "f_sparse": f})
        t0 = [r for r in rows if r["level"] == level and r["arm"] == "ticket"][0]["f_sparse"]
        cumulative += training_flops(t0, f_dense, steps, batch)  # IMP trains every level up to this one
        for r in rows:
            if r["level"] != level:
                continue
            mt = test[(test.arm == r["arm"]) & (test.seed == r["seed"])]
            r["density"] = float(mt.density.iloc[0])
            r["final_acc"] = float(mt[mt.step == mt.step.max()].accuracy.iloc[0])
            es = int(mt.early_stop_step.iloc[0])
            r["early_stop_acc"] = float(mt[mt.step == es].accuracy.iloc[0]) if es > 0 else r["final_acc"]
            u = n_updates if r["arm"] == "rigl" else 0
            r["train_flops"] = training_flops(r["f_sparse"], f_dense, steps, batch, dense_grad_steps=u)
            r["imp_flops"] = cumulative if r["arm"] == "ticket" else np.nan
    df = pd.DataFrame(rows)
    g = df.groupby(["level", "arm"], sort=False)
    out = g.agg(density=("density", "mean"), seeds=("seed", "nunique"), train_tflops=("train_flops", "mean"),
                imp_tflops=("imp_flops", "mean")).reset_index()
    for col, name in (("final_acc", "final"), ("early_stop_acc", "early_stop")):  # DESIGN rule 4: say n
        spread = g[col].apply(lambda v: seed_spread(v.to_numpy())).tolist()
        out[name], out[f"{name}_low"], out[f"{name}_high"] = ([100 * s[i] for s in spread] for i in range(3))
        out["spread"] = [s[3] for s in spread]
    for c in ("final", "final_low", "final_high", "early_stop", "early_stop_low", "early_stop_high"):
        out[c] = out[c].round(2)
    out = out[["level", "arm", "density", "seeds", "final", "final_low", "final_high", "early_stop",
               "early_stop_low", "early_stop_high", "spread", "train_tflops", "imp_tflops"]]
    for c in ("train_tflops", "imp_tflops"):
        out[c] = (out[c] / 1e12).round(4)
    out["density"] = out["density"].round(4)
    return out


def layer_table(run: Path) -> pd.DataFrame:
    """Per (level, arm, layer) of the static/set/rigl members: ``density`` (final mask) and ``ever_active``
    (weights active at any step / layer size), mean over seeds (copy 0), from each complete level's
    ``ever_active.parquet``; empty where no level stored one."""
    frames = []
    for d in sorted(run.glob("level_[0-9][0-9][0-9]")):
        if (d / "COMPLETE").is_file() and (d / "ever_active.parquet").is_file():
            e = pd.read_parquet(d / "ever_active.parquet")
            frames.append(e[e["copy"] == 0].assign(level=int(d.name[6:])))
    cols = ["level", "arm", "layer", "seeds", "density", "ever_active"]
    if not frames:
        return pd.DataFrame(columns=cols)
    e = pd.concat(frames, ignore_index=True)
    e = e.assign(density=e["active"] / e["size"], ever_active=e["ever"] / e["size"])
    out = e.groupby(["level", "arm", "layer"], sort=False).agg(
        seeds=("seed", "nunique"), density=("density", "mean"), ever_active=("ever_active", "mean")).reset_index()
    return out[cols].round({"density": 4, "ever_active": 4})


def _show(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False) if hasattr(table, "to_markdown") else table.to_string(index=False)


if __name__ == "__main__":
    run = Path(sys.argv[1])
    print(_show(main(run)))
    layers = layer_table(run)
    if len(layers):
        print()
        print(_show(layers))

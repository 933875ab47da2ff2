"""Layer-wise sensitivity analysis: prune one layer alone to each density, no retraining, evaluate.

Every (layer, density) variant of the trained ticket is one member of a population evaluated in a
single vmapped pass. ``rates_for`` turns the table into per-layer IMP rates that keep the accuracy
drop of each layer under a tolerance (usable as ``prune.rates``). A language model is judged by bits
per byte instead (column ``metric``): its ``drop`` is the bits per byte gained over the unpruned network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
import pandas as pd

from ..config import ConfigError
from .criteria import magnitude_scores
from ..models import structure_of
from .masks import leaf_name, prunable, prune_to_density
from ..store import atomic_write_bytes, load_tree, parquet_bytes
from ..stored import StoredRun
from ..train import apply_mask, chunk_split, is_language_model, lm_metrics, make_eval_fn, stack, unstack

def sensitivity(run_dir: str | Path, level: int, densities: Sequence[float], member: int = 0,
                then: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """Tidy table: layer, density, split, accuracy, loss, drop (vs the unpruned level-L network), written to
    ``level_L/sensitivity.parquet`` under the run's lock; ``then(table)`` runs under it too (the CLI writes
    its figure into the level folder there)."""
    if not all(0 < d <= 1 for d in densities):
        raise ConfigError(f"--densities {list(densities)} is not allowed; expected fractions in (0, 1]")
    run_dir = Path(run_dir)
    run = StoredRun.open(run_dir)
    with run.store.lock():  # the stages' lock: nothing is read or written under a grow (RunBusyError: busy)
        table = _sensitivity(run, level, densities, member)
        if then is not None:
            then(table)
        return table


def _sensitivity(run: StoredRun, level: int, densities: Sequence[float], member: int) -> pd.DataFrame:
    run.check_level(level)
    cfg, store, data, model = run.cfg, run.store, run.data, run.model
    final = load_tree(store.level_dir(level) / "final.msgpack")
    masks = load_tree(store.level_dir(level) / "masks.msgpack")
    params, bs, mask = unstack(final["params"], member), unstack(final["batch_stats"], member), unstack(masks, member)
    can = prunable(params, cfg.prune, structure_of(model))
    leaves_can, treedef = jax.tree.flatten(can)
    names = [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    scores = magnitude_scores(params)
    variants, labels = [mask], [("(none)", 1.0)]
    for i, ok in enumerate(leaves_can):
        if not ok:
            continue
        only = jax.tree.unflatten(treedef, [j == i for j in range(len(leaves_can))])
        for d in densities:
            variants.append(prune_to_density(scores, mask, only, d))
            labels.append((names[i].removesuffix("/kernel"), float(d)))
    pop_params = stack([apply_mask(params, m) for m in variants])
    pop_bs = stack([bs] * len(variants))
    evaluate = make_eval_fn(model)
    lm = is_language_model(data)
    rows = []
    for split, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test)):
        if not len(x):
            continue
        loss, acc = evaluate(pop_params, pop_bs, *chunk_split(x, y, cfg.train.eval_batch_size))
        loss, acc = np.asarray(loss), np.asarray(acc)
        for (layer, d), l, a in zip(labels[1:], loss[1:], acc[1:]):
            row = {"level": level, "layer": layer, "density": d, "split": split, "loss": float(l),
                   "accuracy": float(a), "drop": float(acc[0] - a), "base_accuracy": float(acc[0]),
                   "metric": "accuracy"}
            if lm:  # judged by bits per byte (lower is better): drop = how many bits per byte it lost
                bpb, base = lm_metrics(float(l))["bits_per_byte"], lm_metrics(float(loss[0]))["bits_per_byte"]
                row.update(bits_per_byte=bpb, base_bits_per_byte=base, drop=bpb - base, metric="bits_per_byte")
            rows.append(row)
    df = pd.DataFrame(rows)
    atomic_write_bytes(store.level_dir(level) / "sensitivity.parquet", parquet_bytes(df))
    return df


def rates_for(table: pd.DataFrame, tolerance: float, levels: int, split: str = "val") -> dict[str, float]:
    """Per-layer rates: each layer reaches, after ``levels`` IMP levels, the lowest tested density
    whose accuracy drop on ``split`` is <= ``tolerance`` (rate = 1 - density^(1/levels))."""
    if levels < 1:
        raise ConfigError("prune.levels must be >= 1 to turn densities into per-level rates")
    t = table[table["split"] == split] if (table["split"] == split).any() else table[table["split"] == "test"]
    out = {}
    for layer, g in t.groupby("layer"):
        ok = g[g["drop"] <= tolerance]
        d = float(ok["density"].min()) if len(ok) else 1.0
        out[layer] = round(1.0 - d ** (1.0 / levels), 6)
    return out

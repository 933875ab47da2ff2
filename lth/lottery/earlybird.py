"""Early-bird detection (You et al. 2020, "Drawing Early-Bird Tickets"), recorded during the dense level.

At every epoch end of level 0 (and at step 0), each seed's weights are copied to the host and pruned
by magnitude at the level-1 pruning rate (the mask level 1's ticket would get if training stopped
there: the configured per-layer rates, layerwise or global); the table holds the normalized Hamming
distance between the masks of successive epochs, per prunable layer and over all of them. You et al.
prune channels by batch-norm scale; we use the weight masks that IMP itself draws. A distance that
stays below a small threshold (they use 0.1) marks the epoch from which the ticket's mask is drawn.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
import pandas as pd

from ..config import ExperimentConfig
from ..models import Structure
from ..prune.masks import leaf_name, magnitude_prune
from ..prune.schedules import oneshot_config
from ..train import unstack

COLUMNS = ["seed", "epoch", "step", "layer", "distance"]


def applies(cfg: ExperimentConfig) -> bool:
    """Early-bird masks are IMP's weight masks: unstructured pruning with the imp or oneshot schedule."""
    return cfg.prune.granularity == "weight" and cfg.prune.schedule in ("imp", "oneshot")


def epoch_ends(num_steps: int, spe: int) -> list[int]:
    """Step 0, every epoch end and the last step."""
    return sorted({0, num_steps, *range(spe, num_steps + 1, max(spe, 1))})


def mask_distance(a: Any, b: Any, can_prune: Any) -> dict[str, float]:
    """Normalized Hamming distance of two masks: ``{layer: differing / size}`` per prunable leaf, and
    ``'all'``: differing / size over every prunable weight."""
    out, diff, size = {}, 0, 0
    flat = jax.tree_util.tree_flatten_with_path(a)[0]
    for (path, x), y, p in zip(flat, jax.tree.leaves(b), jax.tree.leaves(can_prune)):
        if not p:
            continue
        d = int(np.count_nonzero(np.asarray(x, bool) != np.asarray(y, bool)))
        out[leaf_name(path)] = d / x.size
        diff, size = diff + d, size + x.size
    out["all"] = diff / size if size else 0.0
    return out


class EarlyBird:
    """Observer of the dense level (``Engine.run(observe=...)``) for the members ``index`` of the
    population, which are the seeds ``seeds``; :meth:`table` gives the rows of ``earlybird.parquet``."""

    def __init__(self, cfg: ExperimentConfig, can_prune: Any, seeds: Sequence[int], index: Sequence[int],
                 spe: int, structure=None):
        self.prune = oneshot_config(cfg.prune) if cfg.prune.schedule == "oneshot" else cfg.prune
        self.can_prune, self.seeds, self.index, self.spe = can_prune, list(seeds), list(index), spe
        self.previous: list[Any] = [None] * len(self.index)
        self.structure = structure  # the model's declared Structure (frozen layers are never pruned)
        self.rows: list[dict] = []

    def __call__(self, step: int, weights: dict) -> None:
        for j, k in enumerate(self.index):
            params = unstack(weights["params"], k)
            ones = jax.tree.map(lambda p: np.ones(np.shape(p), bool), params)
            mask = magnitude_prune(params, ones, self.prune, self.structure)
            if self.previous[j] is not None:
                for layer, d in mask_distance(self.previous[j], mask, self.can_prune).items():
                    self.rows.append({"seed": self.seeds[j], "epoch": -(-step // self.spe), "step": step,
                                      "layer": layer, "distance": d})
            self.previous[j] = mask

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

"""Hidden-unit pruning of the MLPs inside blocks (``prune.granularity = "neuron"`` on a transformer): the
two-layer MLPs ``next(act(layer(x)))`` a model declares (:attr:`lth.models.Structure.mlps`).

Removing hidden unit c masks column c of ``layer``'s kernel and entry c of its bias, and row c of
``next``'s kernel. The unit's pre-activation is then exactly 0, its activation act(0) = 0 (GELU, ReLU),
and whatever it held, its row of ``next`` adds exactly 0: the unit no longer changes the output. Each
level removes ``round_half_up(rate * alive)`` of every MLP's surviving units (the rate ``prune.rates``
gives ``layer`` by its name or kind, e.g. ``mlp``, else ``prune.rate``), those with the smallest l1 or
l2 norm (``prune.structure_norm``) of their surviving incoming weights first (ties: lower index), as
the hidden units of a chain (:mod:`lth.prune.structured`). Pure functions on one member's pytrees.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..config import PruneConfig
from ..models import Structure
from .masks import named_rate

PyTree = Any


def node(tree: dict, path: str) -> dict:
    """The subtree of ``tree`` at module path ``path`` (``"block_0/mlp/fc_in"``)."""
    for k in path.split("/"):
        tree = tree[k]
    return tree


def check_mlps(params: PyTree, st: Structure) -> None:
    """ValueError unless every declared MLP is two Dense kernels ``[d, H]``, ``[H, d']`` sharing H."""
    for layer, nxt in st.mlps:
        try:
            shapes = [tuple(node(params, x)["kernel"].shape) for x in (layer, nxt)]
        except (KeyError, TypeError):
            raise ValueError(f"the declared MLP ({layer!r}, {nxt!r}) is not two Dense layers with kernels") from None
        if len(shapes[0]) != 2 or len(shapes[1]) != 2 or shapes[0][1] != shapes[1][0]:
            raise ValueError(f"the declared MLP ({layer!r}, {nxt!r}) has kernels {shapes[0]} and {shapes[1]}, "
                             "which share no hidden dimension")


def alive_hidden(mask: PyTree, layer: str) -> np.ndarray:
    """Bool ``[H]``: which hidden units of the MLP whose first layer is ``layer`` still have an input."""
    return np.asarray(node(mask, layer)["kernel"], bool).any(axis=0)


def remove_hidden(mask: dict, layer: str, nxt: str, drop) -> dict:
    """Copy of ``mask`` without hidden units ``drop``: ``layer``'s columns and bias entries, ``nxt``'s rows."""
    mask = copy_masks(mask)
    first, second = node(mask, layer), node(mask, nxt)
    drop = np.asarray(drop, int)
    first["kernel"][:, drop] = False
    if "bias" in first:
        first["bias"][drop] = False
    second["kernel"][drop, :] = False
    return mask


def _excluded(cfg: PruneConfig, layer: str) -> bool:
    parts = layer.split("/")
    return any(p in cfg.exclude or "/".join(parts[:i + 1]) in cfg.exclude for i, p in enumerate(parts))


def mlp_rate(cfg: PruneConfig, layer: str, st: Structure) -> float:
    """The rate of the MLP whose first layer is ``layer``: 0 when excluded, else prune.rates by name or kind,
    else prune.rate."""
    if _excluded(cfg, layer):
        return 0.0
    rate = named_rate(cfg, layer, st)
    return cfg.rate if rate is None else rate


def mlp_prune(params: PyTree, mask: PyTree, cfg: PruneConfig, st: Structure) -> PyTree:
    """Next mask: remove the lowest-norm surviving hidden units of every declared MLP (module docstring)."""
    new = copy_masks(mask)
    for layer, nxt in st.mlps:
        alive = alive_hidden(new, layer)
        n_drop = int(math.floor(mlp_rate(cfg, layer, st) * alive.sum() + 0.5))
        if n_drop == 0:
            continue
        w = np.abs(np.where(node(new, layer)["kernel"], np.asarray(node(params, layer)["kernel"], np.float64), 0.0))
        score = w.sum(0) if cfg.structure_norm == "l1" else np.sqrt((w ** 2).sum(0))
        scores = np.where(alive, score, np.inf)
        new = remove_hidden(new, layer, nxt, np.argsort(scores, kind="stable")[:n_drop])
    return new


def copy_masks(tree):
    """A fresh boolean numpy copy of a (nested dict) mask tree."""
    if isinstance(tree, dict):
        return {k: copy_masks(v) for k, v in tree.items()}
    return np.array(tree, bool, copy=True)

"""Pruning: scores -> masks, per-layer rates, controls. Pure functions on one member's pytrees.

Knows no training loop. Masks are bool pytrees shaped like params; a leaf that is not prunable
(biases and norm parameters by default, excluded layers) always has an all-True mask.

Counts are exact: pruning a layer with r surviving weights at rate p removes ``round_half_up(p * r)``
of them (the smallest by magnitude, ties broken by position), so the density schedule is known to
the weight in advance (:func:`expected_counts`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from ..config import PruneConfig
from ..models import Structure, layer_key, layer_kind, path_names
from .criteria import magnitude_scores
from .signals import scatter_flat, top_count_global

PyTree = Any


def layer_table(params: PyTree, structure: Structure | None = None) -> dict[str, str]:
    """Every layer name of ``params`` -> the kind of its kernel ('dense', 'conv', 'output'), or 'other'.

    ``structure`` (the model's, :func:`lth.models.structure_of`) declares output and frozen layers;
    None: the naming convention of :func:`lth.models.layer_kind`. So do the functions below."""
    out: dict[str, str] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        kind = layer_kind(path, leaf, structure)
        if kind in ("dense", "conv", "output") or layer_key(path) not in out:
            out[layer_key(path)] = kind if kind in ("dense", "conv", "output") else "other"
    return out


def leaf_name(path) -> str:
    """'dense_0/kernel' style name of a parameter leaf."""
    return "/".join(path_names(path))


def layer_rates(params: PyTree, cfg: PruneConfig, structure: Structure | None = None) -> PyTree:
    """Per-leaf pruning rate; 0.0 for leaves that are never pruned."""

    def rate(path, leaf):
        kind = layer_kind(path, leaf, structure)
        names = path_names(path)[:-1]
        named = named_rate(cfg, "/".join(names), structure)
        if named is not None and kind in ("conv", "dense", "output"):
            return named
        if any(n in cfg.exclude or "/".join(names[: i + 1]) in cfg.exclude for i, n in enumerate(names)):
            return 0.0
        if structure is not None and structure.is_spared("/".join(names)):
            return 0.0
        if kind == "conv":
            return cfg.conv_rate if cfg.conv_rate is not None else cfg.rate
        if kind == "dense":
            return cfg.rate
        if kind == "output":
            return cfg.output_rate if cfg.output_rate is not None else cfg.rate / 2
        if kind == "bias" and cfg.prune_biases:
            return cfg.rate
        return 0.0

    return jax.tree_util.tree_map_with_path(rate, params)


def named_rate(cfg: PruneConfig, layer: str, structure: Structure | None = None) -> float | None:
    """The rate ``prune.rates`` gives ``layer``: by its name, else by its declared kind (``attn``, ``mlp``,
    ``embed``, ``head``: :attr:`lth.models.Structure.kinds`); None when it names neither."""
    if not cfg.rates:
        return None
    if layer in cfg.rates:
        return cfg.rates[layer]
    kind = structure.kind_of(layer) if structure is not None else None
    return cfg.rates.get(kind) if kind is not None else None


def prunable(params: PyTree, cfg: PruneConfig, structure: Structure | None = None) -> PyTree:
    """Per-leaf bool: is this leaf ever pruned (a kernel, or a bias with prune_biases, not excluded or
    frozen; of a spared layer only when prune.rates names it or its kind)."""

    def ok(path, leaf):
        kind = layer_kind(path, leaf, structure)
        names = path_names(path)[:-1]
        if any(n in cfg.exclude or "/".join(names[: i + 1]) in cfg.exclude for i, n in enumerate(names)):
            return False
        if (structure is not None and structure.is_spared("/".join(names))
                and named_rate(cfg, "/".join(names), structure) is None):
            return False
        return kind in ("conv", "dense", "output") or (kind == "bias" and cfg.prune_biases)

    return jax.tree_util.tree_map_with_path(ok, params)


def _n_prune(rate: float, remaining: int) -> int:
    return int(math.floor(rate * remaining + 0.5))


def _keep_top(score: np.ndarray, mask: np.ndarray, n_keep: int) -> np.ndarray:
    """Mask keeping the n_keep highest scores among the surviving entries (ties: lower index wins)."""
    flat = np.where(mask.ravel(), score.ravel().astype(np.float64), -np.inf)
    order = np.argsort(-flat, kind="stable")
    out = np.zeros(flat.shape, bool)
    out[order[:n_keep]] = True
    return out.reshape(mask.shape)


def prune_by_score(scores: PyTree, mask: PyTree, params_like: PyTree, cfg: PruneConfig,
                   structure: Structure | None = None) -> PyTree:
    """Next mask: remove the lowest-scoring surviving weights, per layer or globally (``cfg.scope``)."""
    rates = layer_rates(params_like, cfg, structure)
    leaves_s, treedef = jax.tree.flatten(scores)
    leaves_m = [np.asarray(m, bool) for m in treedef.flatten_up_to(mask)]
    leaves_r = treedef.flatten_up_to(rates)
    if cfg.scope == "layerwise":
        new = []
        for s, m, r in zip(leaves_s, leaves_m, leaves_r):
            if r == 0.0:
                new.append(m.copy())
                continue
            remaining = int(m.sum())
            new.append(_keep_top(np.asarray(s), m, remaining - _n_prune(r, remaining)))
        return jax.tree.unflatten(treedef, new)
    # global: rank every prunable weight together at the base rate
    idx = [i for i, r in enumerate(leaves_r) if r > 0.0]
    flat_s = np.concatenate([np.asarray(leaves_s[i]).ravel() for i in idx])
    flat_m = np.concatenate([leaves_m[i].ravel() for i in idx])
    remaining = int(flat_m.sum())
    keep = _keep_top(flat_s, flat_m, remaining - _n_prune(cfg.rate, remaining))
    return jax.tree.unflatten(treedef, scatter_flat(keep, leaves_m, idx))


def magnitude_prune(params: PyTree, mask: PyTree, cfg: PruneConfig, structure: Structure | None = None) -> PyTree:
    """IMP step: prune a fraction of the *remaining* weights with the smallest |w| (``structure``: what
    the model declares, e.g. its frozen embeddings, :func:`lth.models.structure_of`)."""
    return prune_by_score(magnitude_scores(params), mask, params, cfg, structure)


def prune_to_density(scores: PyTree, mask: PyTree, can_prune: PyTree, target: float) -> PyTree:
    """Keep ``round(target * size)`` highest-scoring weights of every prunable leaf (never regrowing)."""

    def one(s, m, p):
        m = np.asarray(m, bool)
        if not p:
            return m.copy()
        keep = min(int(m.sum()), int(math.floor(target * m.size + 0.5)))
        return _keep_top(np.asarray(s), m, keep)

    return jax.tree.map(one, scores, mask, can_prune)


def keep_counts(scores: PyTree, counts: PyTree) -> PyTree:
    """Mask keeping, in every leaf, its ``counts`` highest scores (ties: lower index wins); a leaf whose
    count is its size stays all True. Pruning at initialization at given per-layer counts."""

    def one(s, k):
        s = np.asarray(s)
        return _keep_top(s, np.ones(s.shape, bool), int(k))

    return jax.tree.map(one, scores, counts)


def keep_global(scores: PyTree, can_prune: PyTree, k: int) -> PyTree:
    """Mask keeping the ``k`` highest scores of all ``can_prune`` leaves pooled (ties: the earlier leaf in
    tree order, then the lower index); the other leaves stay all True. Pruning at initialization with
    the method's own per-layer allocation."""
    ones = jax.tree.map(lambda s: np.ones(np.shape(s), bool), scores)
    return top_count_global(scores, ones, can_prune, int(k))


def random_mask_like(mask: PyTree, can_prune: PyTree, rng: np.random.Generator) -> PyTree:
    """A uniformly random mask with exactly the same number of survivors in every prunable leaf."""

    def one(m, p):
        m = np.asarray(m, bool)
        if not p:
            return m.copy()
        out = np.zeros(m.size, bool)
        out[rng.choice(m.size, size=int(m.sum()), replace=False)] = True
        return out.reshape(m.shape)

    return jax.tree.map(one, mask, can_prune)


def shuffle_mask(mask: PyTree, can_prune: PyTree, rng: np.random.Generator) -> PyTree:
    """The ticket's mask with its entries permuted within each prunable leaf."""

    def one(m, p):
        m = np.asarray(m, bool)
        return rng.permutation(m.ravel()).reshape(m.shape) if p else m.copy()

    return jax.tree.map(one, mask, can_prune)


def density(mask: PyTree, can_prune: PyTree) -> float:
    """Fraction of prunable weights remaining."""
    kept = total = 0
    for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(can_prune)):
        if p:
            kept += int(np.asarray(m).sum())
            total += int(np.asarray(m).size)
    return kept / total if total else 1.0


def expected_counts(params: PyTree, cfg: PruneConfig, level: int, structure: Structure | None = None) -> PyTree:
    """Surviving weights per leaf after ``level`` layerwise IMP levels (exact, from the rates)."""

    def count(p, r):
        n = int(np.asarray(p).size)
        for _ in range(level):
            n -= _n_prune(r, n) if r else 0
        return n

    return jax.tree.map(count, params, layer_rates(params, cfg, structure))


def sparsity_rows(params: PyTree, mask: PyTree, can_prune: PyTree, structure: Structure | None = None) -> list[dict]:
    """Per-leaf report: layer, shape, count, non-zeros (of the weights), mask density, prunable."""
    rows = []
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, p), m, pr in zip(flat_p, jax.tree.leaves(mask), jax.tree.leaves(can_prune)):
        p = np.asarray(p)
        rows.append({"layer": leaf_name(path), "kind": layer_kind(path, p, structure),
                     "shape": "x".join(map(str, p.shape)),
                     "count": int(p.size), "nonzero": int(np.count_nonzero(p)),
                     "kept": int(np.asarray(m).sum()), "density": float(np.asarray(m).mean()),
                     "prunable": bool(pr)})
    return rows

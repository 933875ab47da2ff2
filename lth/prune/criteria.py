"""Pruning criteria: ``(params, signals) -> scores`` (higher = keep), one registry entry per name.

A criterion scores one trained member; a selection rule (:mod:`lth.prune.masks`) turns the scores
into a mask. :data:`CRITERIA` maps ``prune.criterion`` to its function; :func:`register` adds one
(in the manner of jaxpruner's ``api.py`` and open_lth's ``pruning/registry.py``). The gradient and
Hessian signals a criterion may need are in :mod:`lth.prune.signals`; :class:`Signals` computes them
on request only, so magnitude and random pruning touch no data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

from .. import registry
from ..config import PruneConfig
from ..trees import to_device, to_numpy
from .signals import hessian_diagonal, mean_gradient

PyTree = Any

# Offsets that separate the rng streams of different uses of one seed (values fixed: results depend on them).
RANDOM_SCORES = 3
HESSIAN_KEY = 2_000_003


def magnitude_scores(params: PyTree) -> PyTree:
    return jax.tree.map(lambda p: np.abs(np.asarray(p)), params)

def saliency_scores(params: PyTree, grads: PyTree) -> PyTree:
    """|w * dL/dw|: the first-order loss change of removing each weight (SNIP, Lee et al. 2019)."""
    return jax.tree.map(lambda p, g: np.abs(np.asarray(p) * np.asarray(g)), params, grads)

def obd_scores(params: PyTree, hessian_diag: PyTree) -> PyTree:
    """w^2 * H_ii / 2: Optimal Brain Damage saliency (LeCun et al. 1990, eq. 7) at a minimum."""
    return jax.tree.map(lambda p, h: np.square(np.asarray(p)) * np.asarray(h) / 2, params, hessian_diag)

def random_scores(params: PyTree, rng: np.random.Generator) -> PyTree:
    """Uniform random scores: pruning by them is random pruning with the configured rates."""
    return jax.tree.map(lambda p: rng.random(np.shape(p)), params)


@dataclass(frozen=True)
class Signals:
    """What a criterion may use besides the weights of one trained member.

    ``batches()``: the member's first ``prune.criterion_batches`` training batches ``[(x, y), ...]``.
    """
    model: Any
    params: PyTree
    batch_stats: PyTree
    seed: int
    level: int
    cfg: PruneConfig
    batches: Callable[[], list]


Criterion = Callable[[PyTree, Signals], PyTree]
CRITERIA: dict[str, Criterion] = registry.CRITERIA.entries  # built-in and registered criteria by name


def register(name: str) -> Callable[[Criterion], Criterion]:
    """Decorator: make ``fn(params, signals) -> scores`` the criterion ``name`` (lth.registry.CRITERIA;
    user code can also name a criterion by import path or entry point, without registering)."""
    def add(fn: Criterion) -> Criterion:
        return registry.CRITERIA.register(name, fn, replace=True)
    return add


@register("magnitude")
def _magnitude(params: PyTree, sig: Signals) -> PyTree:
    return magnitude_scores(params)


@register("random")
def _random(params: PyTree, sig: Signals) -> PyTree:
    return random_scores(params, np.random.default_rng([sig.seed, sig.level, RANDOM_SCORES]))


@register("saliency")
def _saliency(params: PyTree, sig: Signals) -> PyTree:
    p, b = to_device(params), to_device(sig.batch_stats)
    return saliency_scores(params, to_numpy(mean_gradient(sig.model, p, b, sig.batches())))


@register("obd")
def _obd(params: PyTree, sig: Signals) -> PyTree:
    batches = sig.batches()
    p, b = to_device(params), to_device(sig.batch_stats)
    key = jax.random.fold_in(jax.random.key(sig.seed + HESSIAN_KEY), sig.level)
    hdiag = hessian_diagonal(sig.model, p, b, batches, key, sig.cfg.hessian_samples, sig.cfg.hessian)
    return obd_scores(params, to_numpy(hdiag))


def scores(params: PyTree, sig: Signals) -> PyTree:
    """Per-weight scores of the criterion ``sig.cfg.criterion`` (higher = keep)."""
    return registry.CRITERIA.resolve(sig.cfg.criterion)(params, sig)

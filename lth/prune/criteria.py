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
from ..models import layer_kinds, structure_of
from ..trees import to_device, to_numpy
from .signals import hessian_diagonal, hessian_gradient_product, mean_gradient, synflow_scores

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

def grasp_scores(params: PyTree, hg: PyTree) -> PyTree:
    """``w * (H g)``, higher = keep. GraSP (Wang et al. 2020, eq. 8 and Algorithm 1) scores each weight
    by ``S(-w) = -w * (H g)`` and removes the weights with the *largest* S (removing them reduces the
    gradient flow ``g^T g`` least, or raises it), i.e. keeps the smallest S. We return ``-S``, so that,
    as for every criterion here, the highest scores are kept; the masks are GraSP's."""
    return jax.tree.map(lambda p, h: np.asarray(p) * np.asarray(h), params, hg)

def random_scores(params: PyTree, rng: np.random.Generator) -> PyTree:
    """Uniform random scores: pruning by them is random pruning with the configured rates."""
    return jax.tree.map(lambda p: rng.random(np.shape(p)), params)


@dataclass(frozen=True)
class Signals:
    """What a criterion may use besides the weights of one trained member.

    ``batches()``: the member's first ``prune.criterion_batches`` training batches ``[(x, y), ...]``.
    ``input_shape``: one example's shape (data-free criteria); ``keep``: the survivors the caller will
    keep (pruning-at-init arms), which iterative criteria (synflow) prune towards: per leaf, or one int
    for all ``can_prune`` leaves pooled (``prune.pai_allocation = "global"``); None for IMP, where the
    rates decide. ``can_prune``: per leaf, prunable (needed with an int ``keep``).
    """
    model: Any
    params: PyTree
    batch_stats: PyTree
    seed: int
    level: int
    cfg: PruneConfig
    batches: Callable[[], list]
    input_shape: tuple | None = None
    keep: PyTree | int | None = None
    can_prune: PyTree | None = None


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


@register("snip")
def _snip(params: PyTree, sig: Signals) -> PyTree:
    """SNIP (Lee et al. 2019, eq. 6): |w * dL/dw| on the criterion batches; the ``saliency`` score (SNIP
    normalises by the sum over all weights, which changes no ranking)."""
    return _saliency(params, sig)


def kernel_leaves(model, params: PyTree) -> PyTree:
    """Per leaf bool: a Dense/Conv kernel (what GraSP differentiates; not biases or norm parameters)."""
    return jax.tree.map(lambda k: k in ("dense", "conv", "output"), layer_kinds(params, structure_of(model)))


@register("grasp")
def _grasp(params: PyTree, sig: Signals) -> PyTree:
    """GraSP as its authors run it: the loss of ``logits / prune.grasp_temperature`` (T = 200), ``g`` and
    ``H g`` over the kernels only (``H_ww g_w``; a bias entry scores ``b (H_bw g_w)``)."""
    p, b = to_device(params), to_device(sig.batch_stats)
    hg = hessian_gradient_product(sig.model, p, b, sig.batches(), sig.cfg.grasp_temperature,
                                  kernel_leaves(sig.model, params))
    return grasp_scores(params, to_numpy(hg))


@register("synflow")
def _synflow(params: PyTree, sig: Signals) -> PyTree:
    """SynFlow (Tanaka et al. 2020): data-free; iterative over ``prune.synflow_rounds`` rounds towards
    ``sig.keep`` when given, per leaf or pooled over ``sig.can_prune`` (see
    :func:`lth.prune.signals.synflow_scores`), else one evaluation."""
    shape = sig.input_shape if sig.input_shape is not None else np.shape(sig.batches()[0][0])[1:]
    return synflow_scores(sig.model, params, sig.batch_stats, shape, sig.keep, sig.cfg.synflow_rounds,
                          sig.can_prune)


@register("obd")
def _obd(params: PyTree, sig: Signals) -> PyTree:
    batches = sig.batches()
    p, b = to_device(params), to_device(sig.batch_stats)
    key = jax.random.fold_in(jax.random.key(sig.seed + HESSIAN_KEY), sig.level)
    hdiag = hessian_diagonal(sig.model, p, b, batches, key, sig.cfg.hessian_samples, sig.cfg.hessian)
    return obd_scores(params, to_numpy(hdiag))


def scores(params: PyTree, sig: Signals) -> PyTree:
    """Per-weight scores of the criterion ``sig.cfg.criterion`` (higher = keep), checked: a tree shaped
    like ``params`` with finite (or +-inf) real numbers; ValueError (one line) naming the criterion
    otherwise. NaN scores are an error, never an arbitrary prune."""
    name = sig.cfg.criterion
    out = registry.CRITERIA.call(name, registry.CRITERIA.resolve(name), params, sig)
    return checked_scores(name, params, out, f"seed {sig.seed}, level {sig.level}")


def checked_scores(name: str, params: PyTree, out: Any, where: str) -> PyTree:
    """``out`` (what criterion ``name`` returned for ``params``) as a numpy tree; ValueError naming the
    criterion and the first bad leaf unless it has the structure and shapes of ``params`` and no NaN."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    try:
        got = jax.tree_util.tree_flatten_with_path(out)[0]
    except Exception:  # noqa: BLE001 - anything that is not a pytree
        got = None
    if out is None or got is None or [p for p, _ in got] != [p for p, _ in flat]:
        have = {jax.tree_util.keystr(p) for p, _ in got or []}
        lack = [jax.tree_util.keystr(p) for p, _ in flat if jax.tree_util.keystr(p) not in have]
        raise registry.RegistryError(
            f"criterion {name!r} returned {type(out).__name__}"
            + (f" without scores for {', '.join(lack[:3])}" if out is not None and lack else
               " of another structure" if out is not None else "")
            + " (expected scores shaped like params: score(params, signals) -> scores)")
    for (path, p), (_, v) in zip(flat, got):
        a = np.asarray(v)
        key = jax.tree_util.keystr(path)
        if a.shape != np.shape(p) or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise registry.RegistryError(f"criterion {name!r}: scores for {key} have shape {a.shape} and dtype "
                                         f"{a.dtype}; expected real numbers of the weights' shape {np.shape(p)}")
        if np.issubdtype(a.dtype, np.inexact) and np.isnan(a).any():
            why = ("the member's weights are not finite (it diverged)" if not np.isfinite(np.asarray(p)).all()
                   else "NaN scores would prune arbitrarily")
            raise registry.RegistryError(f"criterion {name!r} gave NaN scores for {key} ({where}): {why}")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [np.asarray(v) for _, v in got])

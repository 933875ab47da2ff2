"""Signals that pruning criteria score weights with: gradients, Hessian diagonals, activations.

Pure functions of one network (params, batch_stats) and a few batches; no training loop.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..models import ACTIVATIONS

PyTree = Any


def _loss(model, params, batch_stats, x, y):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = model.apply(variables, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def mean_gradient(model, params, batch_stats, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> PyTree:
    """Gradient of the mean cross-entropy, averaged over ``batches`` (SNIP uses one or a few)."""
    grad = jax.jit(jax.grad(lambda p, x, y: _loss(model, p, batch_stats, x, y)))
    total = None
    for x, y in batches:
        g = grad(params, jnp.asarray(x), jnp.asarray(y))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda t: t / len(batches), total)


def hessian_diagonal(model, params, batch_stats, batches, key: jax.Array, samples: int = 16,
                     method: str = "hutchinson") -> PyTree:
    """Estimate diag(H) of the loss w.r.t. params.

    ``hutchinson``: E_z[z * (H z)] with Rademacher z (Hutchinson 1989; Yao et al. 2020), H z by
    forward-over-reverse differentiation; unbiased, ``samples`` probes per batch.
    ``fisher``: the empirical Fisher diagonal, mean of squared per-batch gradients (a PSD
    approximation of the Gauss-Newton diagonal, as in LeCun et al. 1990's practical OBD).
    """
    if method == "fisher":
        grad = jax.jit(jax.grad(lambda p, x, y: _loss(model, p, batch_stats, x, y)))
        total = None
        for x, y in batches:
            g = grad(params, jnp.asarray(x), jnp.asarray(y))
            sq = jax.tree.map(jnp.square, g)
            total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        return jax.tree.map(lambda t: t / len(batches), total)
    if method != "hutchinson":
        raise ValueError(f"unknown Hessian estimate {method!r}; expected 'hutchinson' or 'fisher'")

    def probe(p, x, y, k):
        leaves, treedef = jax.tree.flatten(p)
        keys = jax.random.split(k, len(leaves))
        z = jax.tree.unflatten(treedef, [jax.random.rademacher(kk, leaf.shape, leaf.dtype)
                                         for kk, leaf in zip(keys, leaves)])
        grad = jax.grad(lambda q: _loss(model, q, batch_stats, x, y))
        _, hz = jax.jvp(grad, (p,), (z,))
        return jax.tree.map(jnp.multiply, z, hz)

    probes = jax.jit(lambda p, x, y, ks: jax.tree.map(lambda t: t.mean(0),
                                                      jax.vmap(probe, in_axes=(None, None, None, 0))(p, x, y, ks)))
    total = None
    for i, (x, y) in enumerate(batches):
        est = probes(params, jnp.asarray(x), jnp.asarray(y), jax.random.split(jax.random.fold_in(key, i), samples))
        total = est if total is None else jax.tree.map(jnp.add, total, est)
    return jax.tree.map(lambda t: t / len(batches), total)


def activation_sparsity(model, params, batch_stats, x: np.ndarray, chunk: int = 1000) -> dict[str, float]:
    """Fraction of exactly-zero post-ReLU outputs per hidden layer over the examples ``x``."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    zeros = _zero_counter(model)
    counts: dict[str, list[float]] = {}
    for i in range(0, len(x), chunk):
        for name, (z, n) in zeros(variables, jnp.asarray(x[i:i + chunk])).items():
            c = counts.setdefault(name, [0.0, 0.0])
            c[0] += float(z)
            c[1] += float(n)
    return {name: z / n for name, (z, n) in counts.items()}


@functools.lru_cache(maxsize=64)
def _zero_counter(model):
    """Compiled ``(variables, x) -> {layer: (exact zeros, size)}`` of the sown ReLU outputs; one per
    model (Flax modules compare by value), so members and levels reuse it."""

    @jax.jit
    def zeros(variables, xb):
        _, state = model.apply(variables, xb, train=False, mutable=[ACTIVATIONS])
        flat = jax.tree_util.tree_flatten_with_path(state.get(ACTIVATIONS, {}))[0]
        names = ["/".join(str(getattr(k, "key", k)) for k in path[:-1]).removesuffix("_relu") for path, _ in flat]
        return {n: (jnp.sum(a == 0), a.size) for n, (_, a) in zip(names, flat)}

    return zeros

"""Signals that pruning criteria score weights with: gradients, Hessian diagonals and Hessian-gradient
products, synaptic flow, activations.

Pure functions of one network (params, batch_stats) and a few batches; no training loop.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..models import ACTIVATIONS, path_names

PyTree = Any


def _loss(model, params, batch_stats, x, y, temperature=1.0):
    """Mean cross-entropy of the logits divided by ``temperature`` (GraSP's T; 1: the plain loss)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    logits = model.apply(variables, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits / temperature, y).mean()


@functools.lru_cache(maxsize=64)
def _grad_fn(model):
    """Compiled ``(params, batch_stats, x, y, temperature) -> dL/dparams``, one per model (reused across
    members; the temperature is traced, so it costs no compile)."""
    return jax.jit(jax.grad(lambda p, b, x, y, t: _loss(model, p, b, x, y, t)))


@functools.lru_cache(maxsize=64)
def _hvp_fn(model):
    """Compiled ``(params, batch_stats, v, x, y, temperature) -> H v`` (forward-over-reverse: jax.jvp of
    jax.grad)."""
    def hvp(p, b, v, x, y, t):
        return jax.jvp(jax.grad(lambda q: _loss(model, q, b, x, y, t)), (p,), (v,))[1]
    return jax.jit(hvp)


def mean_gradient(model, params, batch_stats, batches: Sequence[tuple[np.ndarray, np.ndarray]],
                  temperature: float = 1.0) -> PyTree:
    """Gradient of the mean cross-entropy (of ``logits / temperature``), averaged over ``batches`` (SNIP
    uses one or a few)."""
    grad = _grad_fn(model)
    total = None
    for x, y in batches:
        g = grad(params, batch_stats, jnp.asarray(x), jnp.asarray(y), temperature)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return jax.tree.map(lambda t: t / len(batches), total)


def hessian_gradient_product(model, params, batch_stats, batches: Sequence[tuple[np.ndarray, np.ndarray]],
                             temperature: float = 1.0, weights: PyTree | None = None) -> PyTree:
    """``H g``: the loss Hessian times its gradient ``g``, both of the mean cross-entropy of ``logits /
    temperature`` averaged over ``batches`` (GraSP's signal, Wang et al. 2020, eq. 8, with the authors'
    temperature). ``g`` is held fixed (computed first, over all batches), then ``H_b g`` of each batch
    is averaged; exact, no sampling. ``weights`` (per leaf bool): restrict ``g`` to those leaves, so the
    weight entries of the result are ``H_ww g_w`` (GraSP differentiates the weights only, not biases)."""
    g = mean_gradient(model, params, batch_stats, batches, temperature)
    if weights is not None:
        g = jax.tree.map(lambda gi, w: gi if w else jnp.zeros_like(gi), g, weights)
    hvp = _hvp_fn(model)
    total = None
    for x, y in batches:
        hg = hvp(params, batch_stats, g, jnp.asarray(x), jnp.asarray(y), temperature)
        total = hg if total is None else jax.tree.map(jnp.add, total, hg)
    return jax.tree.map(lambda t: t / len(batches), total)


def synflow_schedule(keep: PyTree, sizes: PyTree, rounds: int) -> PyTree:
    """Per leaf, the survivors after each of ``rounds`` SynFlow rounds ``[rounds]`` (int): the
    exponential density schedule of Tanaka et al. 2020 (Algorithm 1), per leaf: round r of R keeps
    ``round_half_up(n * (keep / n) ** (r / R))``, never fewer than ``keep``; the last round keeps
    exactly ``keep``."""
    def one(k, n):
        k, n = int(k), int(n)
        r = np.arange(1, rounds + 1)
        counts = np.floor(n * (k / n) ** (r / rounds) + 0.5).astype(np.int64) if n else np.zeros(rounds, np.int64)
        counts = np.maximum(counts, k)
        counts[-1] = k
        return counts
    return jax.tree.map(one, keep, sizes)


def top_count_mask(score: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Mask keeping the ``k`` highest scores among the surviving entries, ties to the lower index (the
    rule of :mod:`lth.prune.masks`), in O(n): a partition finds the k-th value, the ties at it are
    filled in index order."""
    flat = np.where(np.asarray(mask, bool).ravel(), np.asarray(score, np.float64).ravel(), -np.inf)
    keep = np.zeros(flat.size, bool)
    if k > 0:
        thr = np.partition(flat, flat.size - k)[flat.size - k]
        keep = flat > thr
        keep[np.flatnonzero(flat == thr)[:k - int(keep.sum())]] = True
    return keep.reshape(np.shape(mask))


def top_count_global(scores: PyTree, mask: PyTree, can_prune: PyTree, k: int) -> PyTree:
    """Mask keeping the ``k`` highest scores among the surviving entries of every ``can_prune`` leaf
    pooled (ties to the earlier leaf, then the lower index: :func:`top_count_mask` on the concatenation
    in tree order); the other leaves keep their mask."""
    leaves_s, treedef = jax.tree.flatten(scores)
    leaves_m = [np.asarray(m, bool) for m in treedef.flatten_up_to(mask)]
    idx = [i for i, p in enumerate(treedef.flatten_up_to(can_prune)) if p]
    if not idx:
        return jax.tree.unflatten(treedef, [m.copy() for m in leaves_m])
    flat = np.concatenate([np.asarray(leaves_s[i], np.float64).ravel() for i in idx])
    keep = top_count_mask(flat, np.concatenate([leaves_m[i].ravel() for i in idx]), k)
    return jax.tree.unflatten(treedef, scatter_flat(keep, leaves_m, idx))


def scatter_flat(flat: np.ndarray, leaves: list, idx: list[int]) -> list:
    """``leaves`` (copies) with the leaves at ``idx`` replaced by consecutive pieces of ``flat``, each
    reshaped to its leaf: the inverse of concatenating those leaves raveled (a global ranking's mask
    back into layers)."""
    new = [m.copy() for m in leaves]
    off = 0
    for i in idx:
        n = leaves[i].size
        new[i] = flat[off:off + n].reshape(leaves[i].shape)
        off += n
    return new


def _linearised_stats(batch_stats: PyTree) -> PyTree:
    """Batch-norm running statistics replaced by mean 0, variance 1: in inference mode every batch norm
    is then the positive map ``|scale| x / sqrt(1 + eps) + |bias|`` of SynFlow's linearised network."""
    def one(path, leaf):
        name = path_names(path)[-1] if path else ""
        return jnp.ones_like(leaf) if name == "var" else jnp.zeros_like(leaf)
    return jax.tree_util.tree_map_with_path(one, batch_stats)


@functools.lru_cache(maxsize=16)
def _synflow_program(model, input_shape: tuple):
    """Compiled ``(abs params, stats, mask) -> |theta * dR/dtheta|`` of the masked |theta| network."""
    ones = jnp.ones((1, *input_shape), jnp.float64)

    def flow(p, bs):  # R = 1^T f(1; |theta|): the synaptic flow of the linearised network
        variables = {"params": p, **({"batch_stats": bs} if bs else {})}
        return model.apply(variables, ones, train=False).sum()

    def scores_of(absp, bs, mask):
        p = jax.tree.map(lambda w, m: w * m, absp, mask)
        g = jax.grad(flow)(p, bs)
        return jax.tree.map(lambda gi, pi: jnp.abs(gi * pi), g, p)

    return jax.jit(scores_of)


def synflow_scores(model, params, batch_stats, input_shape, keep: PyTree | int | None, rounds: int,
                   can_prune: PyTree | None = None) -> PyTree:
    """SynFlow scores (Tanaka et al. 2020): ``|theta * dR/dtheta|`` with ``R = 1^T f(1; |theta|)``, the
    output sum of the network with every parameter in absolute value on an all-ones input (data-free).

    ``keep`` (per leaf: survivors wanted, the leaf's size for a leaf never pruned): prune iteratively
    over ``rounds`` rounds on the exponential schedule of :func:`synflow_schedule`, recomputing the
    scores on the masked network each round; the result is the last round's scores, ``-inf`` where a
    round pruned the weight, so keeping the ``keep`` highest gives the final mask exactly. ``keep =
    None``: one evaluation on the given weights, no pruning. ``keep`` an int (with ``can_prune``, per
    leaf bool): the survivors among all prunable weights together, pruned globally on the exponential
    schedule of the global density (Tanaka et al. 2020, Algorithm 1: ``N (k/N)^(r/R)`` of the N prunable
    weights after round r), each round keeping the highest scores of every prunable leaf pooled; the
    other leaves are never pruned. Batch norms run in inference mode with
    mean 0 and variance 1 and absolute scale and bias (:func:`_linearised_stats`), so the network
    stays a positive linear map; computed in float64 against overflow of the product of layers.
    """
    sizes = jax.tree.map(lambda p: int(np.size(p)), params)
    pooled = isinstance(keep, (int, np.integer))
    if pooled:
        if can_prune is None:
            raise ValueError("synflow_scores: a global keep count needs can_prune (which leaves are pruned)")
        total = sum(int(n) for n, p in zip(jax.tree.leaves(sizes), jax.tree.leaves(can_prune)) if p)
        schedule = synflow_schedule(int(keep), total, rounds)
    else:
        if keep is None:
            keep, rounds = sizes, 1
        schedule = synflow_schedule(keep, sizes, rounds)
    with jax.enable_x64(True):
        absp = jax.tree.map(lambda p: jnp.abs(jnp.asarray(p, jnp.float64)), params)
        bs = _linearised_stats(jax.tree.map(lambda b: jnp.asarray(b, jnp.float64), batch_stats or {}))
        program = _synflow_program(model, tuple(input_shape))
        mask = jax.tree.map(lambda p: np.ones(np.shape(p), bool), params)
        for r in range(rounds):  # each round: scores on the device, the exact top-k on the host
            scores = jax.device_get(program(absp, bs, mask))
            if pooled:
                mask = top_count_global(scores, mask, can_prune, int(schedule[r]))
            else:
                mask = jax.tree.map(lambda sc, m, c: top_count_mask(sc, m, int(c[r])), scores, mask, schedule)
        scores = jax.device_get(program(absp, bs, mask))
    return jax.tree.map(lambda sc, m: np.where(m, sc, -np.inf), scores, mask)


def hessian_diagonal(model, params, batch_stats, batches, key: jax.Array, samples: int = 16,
                     method: str = "hutchinson") -> PyTree:
    """Estimate diag(H) of the loss w.r.t. params.

    ``hutchinson``: E_z[z * (H z)] with Rademacher z (Hutchinson 1989; Yao et al. 2020), H z by
    forward-over-reverse differentiation; unbiased, ``samples`` probes per batch.
    ``fisher``: the empirical Fisher diagonal :func:`empirical_fisher_diagonal` (mean over the
    examples of the squared per-example gradients; PSD).
    """
    if method == "fisher":
        return empirical_fisher_diagonal(model, params, batch_stats, batches)
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


FISHER_CHUNK = 64  # examples per vmapped gradient: bounds the memory to 64 copies of the gradient


@functools.lru_cache(maxsize=64)
def _sq_grad_sum_fn(model):
    """Compiled ``(params, batch_stats, x [C, ...], y [C], w [C]) -> sum_i w_i (dl_i/dparams)^2``: the
    per-example gradients of one chunk by ``jax.vmap`` of ``jax.grad`` (w = 0 marks padding)."""
    def one(p, b, x, y):
        return jax.grad(lambda q: _loss(model, q, b, x[None], y[None]))(p)

    def chunk(p, b, x, y, w):
        g = jax.vmap(one, in_axes=(None, None, 0, 0))(p, b, x, y)
        return jax.tree.map(lambda t: jnp.tensordot(w, jnp.square(t), axes=1), g)

    return jax.jit(chunk)


def empirical_fisher_diagonal(model, params, batch_stats, batches: Sequence[tuple[np.ndarray, np.ndarray]],
                              chunk: int = FISHER_CHUNK) -> PyTree:
    """diag of the empirical Fisher ``F = 1/N sum_n g_n g_n^T``, ``g_n`` the gradient of example n's
    cross-entropy at its observed label: ``1/N sum_n g_n^2`` over the N examples of ``batches``.

    Per-example gradients (``jax.vmap(jax.grad)``, ``chunk`` examples at a time, the last chunk padded
    with weight 0), not the square of a batch's mean gradient (about 1/B of it). Relation to diag(H):
    the true Fisher (labels drawn from the model's own softmax, not the data's) is the generalized
    Gauss-Newton matrix of the softmax cross-entropy, and equals H at an optimum where the model's
    likelihood is the data's (the residual term of H vanishes there); the empirical Fisher puts the
    observed labels in place of the model's, so it differs from both away from such an optimum
    (Kunstner et al. 2019). Both Fishers are PSD; H need not be.
    """
    fn = _sq_grad_sum_fn(model)
    total, n = None, 0
    for x, y in batches:
        x, y = np.asarray(x), np.asarray(y)
        for i in range(0, len(x), chunk):
            xc, yc = x[i:i + chunk], y[i:i + chunk]
            pad = chunk - len(xc)
            w = np.concatenate([np.ones(len(xc), np.float32), np.zeros(pad, np.float32)])
            if pad:
                xc = np.concatenate([xc, np.zeros((pad, *xc.shape[1:]), xc.dtype)])
                yc = np.concatenate([yc, np.zeros(pad, yc.dtype)])
            sq = fn(params, batch_stats, jnp.asarray(xc), jnp.asarray(yc), jnp.asarray(w))
            total = sq if total is None else jax.tree.map(jnp.add, total, sq)
            n += len(x[i:i + chunk])
    return jax.tree.map(lambda t: t / n, total)


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

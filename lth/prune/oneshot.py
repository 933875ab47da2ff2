"""One-shot pruning of one trained layer from calibration inputs: Wanda and SparseGPT.

Layer-level and pure (jnp); notation as :mod:`lth.prune.obs`: ``w [out, in]`` (the transpose of a
flax kernel), calibration inputs ``x [N, in]``. Both take the layer's target ``density`` (fraction
of its weights kept) or an ``n:m`` pattern (keep ``n`` of every ``m`` consecutive inputs of an
output, the papers' 2:4 and 4:8), and keep an exact number of weights.

- **Wanda** (Sun et al. 2024, Eq. 1): score ``S_ij = |W_ij| * ||X_j||_2`` (the input feature's norm
  over the N calibration rows), compared *per output row*: every row keeps the same number of
  weights, its highest scores. No weight update.
- **SparseGPT** (Frantar & Alistarh 2023, Algorithm 1): the OBS reconstruction of
  :func:`lth.prune.obs.reconstruct` with adaptive mask selection: at the start of each block of
  ``block`` columns (128 in the paper), the block's weights with the smallest OBS saliency
  ``w^2 / [U]_jj^2`` (``[U]_jj^2`` = the inverse Hessian's diagonal over the columns not yet
  processed) are pruned, the same fraction in every block; the kept weights absorb the error.
  Per-block counts are allocated so that the layer keeps exactly ``round(density * size)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .obs import inverse_cholesky, layer_hessian, reconstruct


def _check(w, x, density: float | None, nm: tuple[int, int] | None) -> None:
    if w.ndim != 2 or x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"one-shot pruning needs w [out, in] and x [N, in]; got w {tuple(w.shape)}, "
                         f"x {tuple(x.shape)}")
    if (density is None) == (nm is None):
        raise ValueError("give exactly one of density (unstructured) and nm = (n, m)")
    if density is not None and not 0.0 <= density <= 1.0:
        raise ValueError(f"density = {density}: must be in [0, 1]")
    if nm is not None:
        n, m = nm
        if not 0 < n <= m or w.shape[1] % m:
            raise ValueError(f"n:m = {n}:{m} needs 0 < n <= m and m dividing the layer's "
                             f"{w.shape[1]} inputs")


def _keep_top(scores, k_per_row: int) -> jax.Array:
    """1 at each row's ``k_per_row`` highest scores (ties: the lower column index wins)."""
    order = jnp.argsort(-scores, axis=1, stable=True)
    ranks = jnp.argsort(order, axis=1, stable=True)
    return (ranks < k_per_row).astype(jnp.float32)


def keep_nm(scores, n: int, m: int) -> jax.Array:
    """1 at the ``n`` highest scores of every group of ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = jnp.argsort(-groups, axis=2, stable=True)
    ranks = jnp.argsort(order, axis=2, stable=True)
    return (ranks < n).astype(jnp.float32).reshape(rows, cols)


def wanda_scores(w, x) -> jax.Array:
    """``|W_ij| * ||X_j||_2``: ``[out, in]``."""
    return jnp.abs(w) * jnp.linalg.norm(jnp.asarray(x, jnp.float32), axis=0)[None, :]


def wanda(w, x, *, density: float | None = None, nm: tuple[int, int] | None = None
          ) -> tuple[jax.Array, jax.Array]:
    """Wanda: ``(w * mask, mask)``, per output row (unstructured: every row keeps
    ``round(density * in)`` weights) or ``n:m`` per group."""
    w = jnp.asarray(w, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    _check(w, x, density, nm)
    s = wanda_scores(w, x)
    mask = keep_nm(s, *nm) if nm else _keep_top(s, int(round(density * w.shape[1])))
    return w * mask, mask


def block_prune_counts(rows: int, cols: int, block: int, density: float) -> list[int]:
    """Weights pruned in each block of columns, the same fraction everywhere and summing exactly to
    ``size - round(density * size)``: block b prunes ``P(end_b) - P(start_b)`` with
    ``P(c) = round((1 - density) * rows * c)`` (its cumulative share)."""
    size = rows * cols
    target = size - int(round(density * size))
    ends = list(range(block, cols, block)) + [cols]
    cum = [0] + [int(round(target * e / cols)) for e in ends]
    return [b - a for a, b in zip(cum, cum[1:])]


def sparsegpt(w, x, *, density: float | None = None, nm: tuple[int, int] | None = None,
              block: int = 128, damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
    """SparseGPT: ``(w_new, mask)`` with ``w_new`` exactly 0 where ``mask`` is 0.

    Args:
      w: ``[out, in]`` trained weights; x: ``[N, in]`` calibration inputs of the layer.
      density: fraction of the layer kept (unstructured), or nm: ``(n, m)``.
      block: columns per block (mask selection and lazy updates; the paper: 128). With n:m it is
        rounded down to a multiple of m.
      damp: dampening as a fraction of the mean Hessian diagonal (the paper: 0.01).
    """
    w = jnp.asarray(w, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    _check(w, x, density, nm)
    rows, cols = w.shape
    u = inverse_cholesky(layer_hessian(x, damp))
    if nm:
        block = max(nm[1], block - block % nm[1])
    w_new, mask, _ = reconstruct(w, u, block=block, choose=saliency_chooser(rows, cols, block, density, nm))
    return w_new, mask


def saliency_chooser(rows: int, cols: int, block: int, density: float | None = None,
                     nm: tuple[int, int] | None = None):
    """SparseGPT's adaptive mask selection for :func:`lth.prune.obs.reconstruct`: in each block,
    prune the weights of lowest OBS saliency ``w^2 / [U]_jj^2`` (:func:`block_prune_counts` of them),
    or keep the ``n`` most salient of every ``m`` (``block`` a multiple of m)."""
    if nm is not None:
        n, m = nm
        return lambda wb, d, start: keep_nm(wb ** 2 / d[None, :] ** 2, n, m)
    counts = block_prune_counts(rows, cols, block, density)

    def choose(wb, d, start):
        sal = (wb ** 2 / d[None, :] ** 2).reshape(-1)
        ranks = jnp.argsort(jnp.argsort(sal, stable=True), stable=True)
        return (ranks >= counts[start // block]).astype(jnp.float32).reshape(wb.shape)
    return choose


def reconstruction_error(w, w_new, x) -> float:
    """``||W X^T - W' X^T||_F^2``, the layer-wise objective of both papers."""
    x = jnp.asarray(x, jnp.float32)
    return float(jnp.sum((x @ (jnp.asarray(w) - jnp.asarray(w_new)).T) ** 2))


__all__ = ["wanda", "wanda_scores", "sparsegpt", "saliency_chooser", "keep_nm", "block_prune_counts", "reconstruction_error"]

"""Optimal-brain-surgeon reconstruction of one linear layer, the core of SparseGPT (Frantar &
Alistarh 2023, Algorithm 1) and GPTQ (Frantar et al. 2023, Algorithm 1).

Notation as in the papers: ``W`` is ``[rows, cols]`` = ``[out, in]`` (a flax kernel is its
transpose; a conv kernel ``[kh, kw, cin, out]`` is ``[out, kh*kw*cin]`` with im2col inputs),
``X`` the layer's calibration inputs ``[N, cols]``. The layer-wise objective is
``||W X^T - W' X^T||^2``, whose Hessian in each row is ``H = X^T X`` (the papers' ``2 X X^T``: a
constant factor changes nothing below). Columns are processed left to right; when column ``j`` is
replaced by ``q`` (pruned to 0, or rounded to the grid), the error ``e = (w_j - q) / [U]_jj`` is
spread over the columns not yet processed as ``W[:, j:] -= e [U]_{j, j:}``, where ``U`` is the upper
Cholesky factor of ``H^-1`` (``H^-1 = U^T U``). This is the OBS update with the inverse Hessian of
the remaining columns, read off one Cholesky factor instead of updated column by column.

Lazy batched updates (GPTQ Sec. 4, "Step 2"): inside a block of ``B`` columns the update touches
only the block; the block's accumulated errors reach the later columns in one matmul at its end.
Exact arithmetic gives the same result for every ``B``.

Pure jnp; a block's column loop is a ``lax.fori_loop``. Float32 by default; the factorization is
done in float64 when jax's x64 mode is on, else float32 with the dampening below.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def layer_hessian(x, damp: float = 0.01) -> jax.Array:
    """``H = X^T X + lambda I`` of calibration inputs ``x [N, cols]``, with ``lambda = damp * mean
    diag(X^T X)`` (the papers' dampening, 1% by default). An input that is always 0 (a dead column:
    ``H_jj = 0``) gets ``H_jj = 1`` so that H is invertible; its weights then never matter."""
    x = jnp.asarray(x, jnp.float32)
    h = x.T @ x
    diag = jnp.diag(h)
    h = h + jnp.diag(jnp.where(diag == 0, 1.0, 0.0))
    lam = damp * jnp.mean(jnp.diag(h))
    return h + lam * jnp.eye(h.shape[0], dtype=h.dtype)


def inverse_cholesky(h) -> jax.Array:
    """The upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): the papers' ``Cholesky(H^-1)^T``."""
    n = h.shape[0]
    low = jnp.linalg.cholesky(h)
    eye = jnp.eye(n, dtype=h.dtype)
    low_inv = jax.scipy.linalg.solve_triangular(low, eye, lower=True)
    hinv = low_inv.T @ low_inv
    return jnp.linalg.cholesky(hinv).T


# choose(W_block [rows, B], d [B] = diag(U) of the block, start column) -> keep mask [rows, B]
ChooseMask = Callable[[jax.Array, jax.Array, int], jax.Array]
# fit(W_cols [rows, c]) -> params (a pytree of [rows] arrays, e.g. a quantizer's scale per row)
Fit = Callable[[jax.Array], Any]
# project(column [rows] (already masked), params) -> replacement column [rows]
Project = Callable[[jax.Array, Any], jax.Array]


def reconstruct(w, u, *, block: int, choose: ChooseMask | None = None, project: Project | None = None,
                fit: Fit | None = None, group: int | None = None):
    """Sweep the columns of ``w [rows, cols]`` with the OBS update.

    Args:
      w: the layer's weights ``[rows, cols]``.
      u: :func:`inverse_cholesky` of the layer's Hessian ``[cols, cols]``.
      block: columns per lazy block (the papers: 128). ``choose`` is called once per block, at its
        start, on the block's current (already updated) weights: SparseGPT's adaptive mask selection.
      choose: the keep mask of a block (None: keep all).
      project: what a kept column becomes, given the params of its group (None: itself; GPTQ: its
        rounding to the grid).
      fit: the params of ``project`` from weights ``[rows, c]``: fitted once on the whole layer
        before the sweep (``group`` None: per row), or on each group of ``group`` columns when the
        sweep reaches the group's first column, from the weights as updated so far (GPTQ's groups).
        ``block`` must be a multiple of ``group``. ``fit`` sees the columns outside the group (and
        pruned weights) as zeros, so it must be one that zeros do not change (a min-max range that
        contains 0).

    Returns:
      ``(w_new [rows, cols], mask [rows, cols], params)``: the reconstructed weights (exactly 0
      where the mask is 0), the mask, and the fitted params stacked ``[groups, ...]`` (None
      without ``fit``).
    """
    w = jnp.asarray(w, jnp.float32)
    u = jnp.asarray(u, w.dtype)
    if block < 1:
        raise ValueError(f"block = {block}: the lazy block size must be >= 1")
    if group is not None and (group < 1 or block % group):
        raise ValueError(f"group = {group} must be >= 1 and divide the block size {block}")
    return jax.jit(lambda w, u: _sweep(w, u, block, choose, project, fit, group))(w, u)


def _sweep(w, u, block, choose, project, fit, group):
    rows, cols = w.shape
    n_groups = 1 if group is None else -(-cols // group)
    params = None
    if fit is not None:
        first = fit(w)
        params = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_groups, *a.shape)), first)
    outs, masks = [], []
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2], u[i1:i2, i1:i2]
        m1 = (jnp.ones_like(w1) if choose is None else jnp.asarray(choose(w1, jnp.diag(u1), i1), w.dtype))
        cols_b = jnp.arange(i2 - i1)

        def column(j, carry, u1=u1, m1=m1, i1=i1, cols_b=cols_b):
            w1, q1, e1, params = carry
            col = w1[:, j] * m1[:, j]
            if project is None:
                q = col
            else:
                g = 0 if group is None else (i1 + j) // group
                if group is not None:  # a group's params are fitted when the sweep reaches it
                    in_group = (cols_b >= j) & (cols_b < j + group)  # the rest are zeros to fit
                    fresh = fit(jnp.where(in_group[None, :], w1 * m1, 0.0))
                    start = (i1 + j) % group == 0
                    params = jax.tree.map(
                        lambda p, f: p.at[g].set(jnp.where(start, f, p[g])), params, fresh)
                q = project(col, jax.tree.map(lambda p: p[g], params))
            q = q * m1[:, j]  # a pruned weight stays exactly 0 whatever the projection does
            err = (w1[:, j] - q) / u1[j, j]
            w1 = w1 - err[:, None] * jnp.where(cols_b >= j, u1[j], 0.0)[None, :]
            return w1, q1.at[:, j].set(q), e1.at[:, j].set(err), params

        zeros = jnp.zeros_like(w1)
        _, q1, e1, params = jax.lax.fori_loop(0, i2 - i1, column, (w1, zeros, zeros, params))
        outs.append(q1)
        masks.append(m1)
        if i2 < cols:
            w = w.at[:, i2:].add(-(e1 @ u[i1:i2, i2:]))
    return jnp.concatenate(outs, axis=1), jnp.concatenate(masks, axis=1), params

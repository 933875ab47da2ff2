"""numpy references (float64) for the OBS-based one-shot methods, written from the papers'
equations: the inverse Hessian of the columns not yet processed is kept explicitly and a column is
removed from it by Gaussian elimination (SparseGPT Eq. 3, GPTQ Eq. 3): no Cholesky trick, no lazy
blocks, so lth's factor-based sweep is checked independently."""

import numpy as np


def correlated_inputs(n, cols, seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, cols // 4 + 1))
    mix = rng.normal(size=(base.shape[1], cols))
    return (base @ mix + 0.3 * rng.normal(size=(n, cols))).astype(np.float32)


def layer(rows=12, cols=160, n=400, seed=0):
    rng = np.random.default_rng(seed + 100)
    return rng.normal(size=(rows, cols)).astype(np.float32), correlated_inputs(n, cols, seed)


def np_hessian(x, damp=0.01):
    h = x.astype(np.float64).T @ x.astype(np.float64)
    d = np.diag(h).copy()
    h[np.diag_indices_from(h)] += np.where(d == 0, 1.0, 0.0)
    return h + damp * np.mean(np.diag(h)) * np.eye(len(h))


def np_obs_sweep(w, h, choose_block, project, block, copy=True):
    """Column by column, the paper's OBS update with the explicit inverse Hessian of the remaining
    columns. ``choose_block(w_block, d2, start)`` gets d2_c = [H_{c:}^-1]_cc for the block's columns."""
    w = w.astype(np.float64).copy() if copy else w
    rows, cols = w.shape
    hinv = np.linalg.inv(h)
    mask = np.ones_like(w)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        d2 = np.array([np.linalg.inv(h[c:, c:])[0, 0] for c in range(start, end)])
        mask[:, start:end] = choose_block(w[:, start:end], d2, start)
        for j in range(start, end):
            q = project(w[:, j] * mask[:, j], j) * mask[:, j]
            err = (w[:, j] - q) / hinv[j, j]
            w[:, j:] -= np.outer(err, hinv[j, j:])
            w[:, j] = q
            hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]  # drop column j
    return w, mask


def np_unstructured_chooser(rows, cols, block, density):
    target = rows * cols - round(density * rows * cols)
    ends = list(range(block, cols, block)) + [cols]
    cum = [0] + [round(target * e / cols) for e in ends]

    def choose(wb, d2, start):
        k = cum[start // block + 1] - cum[start // block]
        sal = (wb ** 2 / d2[None, :]).reshape(-1)
        keep = np.ones(sal.size)
        keep[np.argsort(sal, kind="stable")[:k]] = 0
        return keep.reshape(wb.shape)
    return choose


def np_obs_sweep_live(w, h, choose_block, project, block):
    """:func:`np_obs_sweep` updating ``w`` in place, so that a caller's projection (GPTQ's group grids)
    sees the current weights."""
    return np_obs_sweep(w, h, choose_block, project, block, copy=False)

"""GPTQ (Frantar et al. 2023, Algorithm 1): round a trained layer to a b-bit grid column by column,
each column's rounding error spread over the columns not yet rounded by the OBS update of
:mod:`lth.prune.obs`; and the joint SparseGPT + GPTQ pass (Frantar & Alistarh 2023, Sec. 3.5:
prune and quantize in one sweep, 50% + 4-bit in the paper).

Layer-level and pure. ``w [out, in]`` (a flax kernel's transpose), calibration inputs ``x [N, in]``.
The grid is lth's quantizer (:mod:`lth.quant.numerics`): min-max range per output row
(``group_size`` None, "per channel") or per group of ``group_size`` consecutive inputs of a row,
fitted when the sweep reaches the group (from the weights as updated so far, as the paper). With
``act_order`` the columns are swept in order of decreasing Hessian diagonal (the paper's
"act-order" heuristic), groups then being consecutive in that order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..prune.obs import inverse_cholesky, layer_hessian, reconstruct
from ..prune.oneshot import saliency_chooser
from .numerics import dequantize, quantize, scale_zero_point


def _grid(bits: int, scheme: str):
    def fit(wc):  # [rows, c] -> per-row scale and zero point of the min-max range (0 included)
        s, z = scale_zero_point(jnp.min(wc, axis=1), jnp.max(wc, axis=1), bits, scheme)
        return {"scale": s, "zero_point": z}

    def project(col, p):
        return dequantize(quantize(col, p["scale"], p["zero_point"], bits, scheme), p["scale"], p["zero_point"])
    return fit, project


def round_to_nearest(w, *, bits: int, scheme: str = "sym", group_size: int | None = None) -> jax.Array:
    """The baseline GPTQ is measured against: each row (or group) rounded to its own min-max grid."""
    w = jnp.asarray(w, jnp.float32)
    fit, project = _grid(bits, scheme)
    g = w.shape[1] if group_size is None else group_size
    cols = []
    for i in range(0, w.shape[1], g):
        wc = w[:, i:i + g]
        p = fit(wc)
        cols.append(jax.vmap(project, in_axes=(1, None), out_axes=1)(wc, p))
    return jnp.concatenate(cols, axis=1)


def survivor_chooser(fixed, block: int, density: float):
    """SparseGPT's adaptive selection restricted to a fixed mask's survivors (the joint SparseGPT + GPTQ
    pass on a ticket): the layer keeps ``min(round(density * size), survivors)`` weights, every block
    the same fraction of its own survivors (cumulative rounding, so the total is exact), the block's
    most salient (``w^2 / [U]_jj^2``) survivors; a weight the mask pruned is never kept. ``fixed``
    ``[rows, cols]`` in sweep order; the counts depend on the mask's values, so they are traced."""
    rows, cols = fixed.shape
    cum = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(jnp.sum(fixed, axis=0))])
    keep = jnp.minimum(float(round(density * rows * cols)), cum[-1])
    target = jnp.round(keep * cum / jnp.maximum(cum[-1], 1.0))

    def choose(wb, d, start):
        fb = fixed[:, start:start + wb.shape[1]]
        n = target[start + wb.shape[1]] - target[start]
        sal = jnp.where(fb > 0, wb ** 2 / d[None, :] ** 2, -jnp.inf).reshape(-1)
        ranks = jnp.argsort(jnp.argsort(-sal, stable=True), stable=True)
        return (ranks < n).astype(jnp.float32).reshape(wb.shape) * fb
    return choose


def gptq(w, x, *, bits: int, scheme: str = "sym", group_size: int | None = None,
         act_order: bool = False, block: int = 128, damp: float = 0.01,
         density: float | None = None, nm: tuple[int, int] | None = None, mask=None):
    """GPTQ, or SparseGPT + GPTQ jointly when ``density`` or ``nm`` is given.

    ``mask [out, in]`` (1 keeps, 0 prunes): a fixed mask, e.g. a ticket's: its pruned weights come
    out exactly 0 and the kept ones absorb the rounding errors (no new pruning); with ``density``
    too, SparseGPT prunes further among the mask's survivors (:func:`survivor_chooser`). Not with
    ``nm``.

    Returns:
      ``(w_q [out, in], mask [out, in], params)``: the dequantized weights on the grid (exactly 0
      where the mask is 0; the mask is all ones without pruning), and the grid's ``scale`` and
      ``zero_point`` stacked ``[groups, out]`` (groups in sweep order) and ``group_index [in]``
      (int32: the group of each input column; with ``act_order`` the groups are not consecutive
      inputs, as the ``g_idx`` of GPTQ's released code).
    """
    w = jnp.asarray(w, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    rows, cols = w.shape
    if x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"gptq needs w [out, in] and x [N, in]; got w {tuple(w.shape)}, x {tuple(x.shape)}")
    if group_size is not None:
        block = max(group_size, block - block % group_size)
    h = layer_hessian(x, damp)
    perm = jnp.argsort(-jnp.diag(h), stable=True) if act_order else jnp.arange(cols)
    h = h[perm][:, perm]
    wp = w[:, perm]
    u = inverse_cholesky(h)
    fit, project = _grid(bits, scheme)
    if nm is not None:
        block = max(nm[1], block - block % nm[1]) if group_size is None else block
    if mask is not None:
        if nm is not None:
            raise ValueError("gptq: give a fixed mask or nm (new pruning), not both")
        if tuple(mask.shape) != (rows, cols):
            raise ValueError(f"gptq: mask {tuple(mask.shape)} must have w's shape {(rows, cols)}")
        fixed = jnp.asarray(mask, jnp.float32)[:, perm]
        wp = wp * fixed  # a pruned weight is 0 before the grid is fitted, too
        if density is None:
            choose = lambda wb, d, start: fixed[:, start:start + wb.shape[1]]  # noqa: E731
        else:
            choose = survivor_chooser(fixed, block, density)
    elif density is None and nm is None:
        choose = None
    else:
        choose = saliency_chooser(rows, cols, block, density, nm)
    wq, mask, params = reconstruct(wp, u, block=block, choose=choose, project=project, fit=fit,
                                   group=group_size)
    inv = jnp.argsort(perm)
    index = jnp.zeros((cols,), jnp.int32) if group_size is None else (inv // group_size).astype(jnp.int32)
    return wq[:, inv], mask[:, inv], {**params, "group_index": index}

"""N:M semi-structured sparsity: in every group of ``m`` consecutive input weights of one output, at
most ``n`` are non-zero (2:4 is what NVIDIA Ampere sparse tensor cores run; Mishra et al. 2021).

**Groups.** A kernel is viewed as the matrix ``[fan_in, out]`` (a conv's HWIO kernel flattened to
``[kh * kw * cin, out]``, the im2col order, so for ``cin % m == 0`` a group holds ``m`` input channels
of one tap, as in NVIDIA's ASP). Group ``g`` of output ``o`` is rows ``g*m .. g*m+m-1`` of column
``o``. A kernel whose fan-in is not a multiple of ``m`` (e.g. the first conv of an RGB network,
27 rows) cannot be grouped and stays dense, as ASP leaves such layers dense.

**IMP towards N:M.** Every level's mask is exactly ``k:m`` on every grouped kernel (exactly ``k``
survivors per group), with ``k`` decaying from ``m`` to ``n``: a level drops
``max(1, round_half_up(rate * k))`` of the ``k`` survivors of every group, those with the smallest
``|w|`` (ties: the earlier position), and never goes below ``n``; once ``n:m`` is reached the
remaining levels retrain the same mask. ``rate`` is the layer's IMP rate (``prune.rate``,
``conv_rate``, ``output_rate``, ``rates``; a layer with rate 0 or excluded stays dense). This is the
decaying pruning mask of Kao et al. (2022, "Training recipes for N:M structured sparsity with
decaying pruning mask"), one step per IMP level, with rewinding in between as IMP does; masks are
nested (a level only removes survivors). ``prune.schedule = 'oneshot'`` is the ASP recipe (Mishra
et al. 2021): train dense, prune every group straight to ``n`` (for ``target_density <= n/m``), retrain.

**Compact format.** ``values [G, n, out]`` (the kept weights of each group, in position order, zero-
padded when a group has fewer than ``n``) and ``index [G, n, out]`` (each value's position within its
group, ``ceil(log2 m)`` bits: 2 bits for 2:4). :func:`nm_compress`, :func:`nm_decompress`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from .masks import layer_rates, prunable

PyTree = Any


def as_matrix(kernel: np.ndarray) -> np.ndarray:
    """``[fan_in, out]`` view of a dense ``[in, out]`` or conv ``[kh, kw, cin, out]`` kernel."""
    k = np.asarray(kernel)
    return k.reshape(-1, k.shape[-1])


def groupable(kernel_shape, m: int) -> bool:
    """Whether a kernel's fan-in is a multiple of ``m`` (it can hold an N:M mask)."""
    return len(kernel_shape) >= 2 and int(np.prod(kernel_shape[:-1])) % m == 0


def group_counts(mask: np.ndarray, m: int) -> np.ndarray:
    """Survivors per group ``[G, out]`` of a groupable kernel mask."""
    w = as_matrix(mask).astype(bool)
    return w.reshape(-1, m, w.shape[-1]).sum(1)


def index_bits(m: int) -> int:
    """Bits of one in-group position: ``ceil(log2 m)`` (2 for m = 4)."""
    return max(1, math.ceil(math.log2(m)))


def keep_per_group(kernel: np.ndarray, mask: np.ndarray, m: int, k: int) -> np.ndarray:
    """Mask keeping the ``k`` largest-|w| survivors of every group of ``m`` (ties: lower position).

    ``mask`` must have at least ``k`` survivors in every group; the result is nested in it.
    """
    shape = np.shape(kernel)
    w = np.abs(as_matrix(kernel).astype(np.float64))
    keep = as_matrix(mask).astype(bool)
    fan_in, out = w.shape
    score = np.where(keep, w, -np.inf).reshape(fan_in // m, m, out)
    order = np.argsort(-score, axis=1, kind="stable")  # descending |w|, earlier position first on ties
    new = np.zeros_like(score, dtype=bool)
    np.put_along_axis(new, order[:, :k, :], True, axis=1)
    return (new & keep.reshape(score.shape)).reshape(shape)


def next_group_size(k: int, rate: float, n: int) -> int:
    """Survivors per group after one level: ``max(n, k - max(1, round_half_up(rate * k)))``; ``k`` if rate 0."""
    if rate <= 0.0 or k <= n:
        return k
    return max(n, k - max(1, int(math.floor(rate * k + 0.5))))


def group_schedule(m: int, n: int, rate: float, levels: int) -> list[int]:
    """Survivors per group at levels ``0..levels``: ``[m, ..., n, n]`` (ends at n once reached)."""
    ks = [m]
    for _ in range(levels):
        ks.append(next_group_size(ks[-1], rate, n))
    return ks


def nm_prune(params: PyTree, mask: PyTree, cfg, structure=None) -> PyTree:
    """Next IMP mask of one member for ``prune.granularity = 'n:m'`` (see the module docstring).

    Args:
      params: the trained weights of the level.
      mask: the level's mask; for every grouped kernel exactly ``k:m`` (all ones at level 0).
      cfg: the :class:`lth.config.PruneConfig` (``n``, ``m``, rates, exclude).
    Returns:
      a new bool mask, ``k':m`` on every grouped kernel with ``k' = next_group_size(k, rate, n)``.
    """
    rates = layer_rates(params, cfg, structure)
    can = prunable(params, cfg, structure)

    def one(p, mk, r, ok):
        mk = np.asarray(mk, bool)
        if not ok or r == 0.0 or np.ndim(p) < 2 or not groupable(np.shape(p), cfg.m):
            return mk.copy()
        k = int(group_counts(mk, cfg.m).max())
        return keep_per_group(np.asarray(p), mk, cfg.m, next_group_size(k, r, cfg.n))

    return jax.tree.map(one, params, mask, rates, can)


def grouped_fan_ins(params: PyTree, cfg, structure=None) -> tuple[dict[str, int], dict[str, int]]:
    """(kernels that ``nm_prune`` prunes, the other prunable kernels): layer name -> fan-in. A prunable
    kernel with rate > 0 is pruned when its fan-in is a multiple of ``cfg.m``. ``params`` may hold
    shapes only (``jax.eval_shape``)."""
    rates, can = layer_rates(params, cfg, structure), prunable(params, cfg, structure)
    grouped, other = {}, {}
    for (path, p), r, ok in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(rates),
                                jax.tree.leaves(can)):
        shape = np.shape(p)
        if not ok or r == 0.0 or len(shape) < 2:
            continue
        name = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
        (grouped if groupable(shape, cfg.m) else other)[name] = int(np.prod(shape[:-1]))
    return grouped, other


def is_nm(mask: np.ndarray, n: int, m: int) -> bool:
    """Whether a kernel mask has at most ``n`` survivors in every group of ``m`` (False if not groupable)."""
    return groupable(np.shape(mask), m) and bool(group_counts(mask, m).max() <= n)


def nm_compress(kernel: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(values ``[G, n, out]``, index ``[G, n, out]`` uint8) of a kernel with at most n non-zeros per group.

    Values of a group are its non-zeros in position order, zero-padded (index of a pad: the first
    position not holding a value, so indices of a group are distinct). ValueError if a group has more.
    """
    w = as_matrix(kernel)
    fan_in, out = w.shape
    g = w.reshape(fan_in // m, m, out)
    nz = g != 0
    if nz.sum(1).max(initial=0) > n:
        raise ValueError(f"kernel {np.shape(kernel)} has groups with more than {n} of {m} non-zeros")
    # stable sort puts the non-zeros first (in position order), then the zeros (in position order)
    order = np.argsort(~nz, axis=1, kind="stable")[:, :n, :]
    values = np.take_along_axis(g, order, axis=1)
    return values.astype(w.dtype), order.astype(np.uint8)


def nm_decompress(values: np.ndarray, index: np.ndarray, m: int, shape) -> np.ndarray:
    """Dense kernel of ``shape`` from :func:`nm_compress`'s arrays."""
    G, _, out = values.shape
    dense = np.zeros((G, m, out), values.dtype)
    np.put_along_axis(dense, index.astype(np.int64), values, axis=1)
    return dense.reshape(shape)


def nm_bytes(shape, n: int, m: int, value_bits: int) -> int:
    """Bytes of a kernel in the compact N:M format: ``ceil(V value_bits / 8) + ceil(V index_bits(m) / 8)``
    with ``V = fan_in / m * n * out`` stored values (fp32 values: value_bits = 32)."""
    fan_in, out = int(np.prod(shape[:-1])), int(shape[-1])
    v = fan_in // m * n * out
    return math.ceil(v * value_bits / 8) + math.ceil(v * index_bits(m) / 8)

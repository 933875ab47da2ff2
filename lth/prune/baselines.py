"""Small-dense baselines: a dense model of the same family whose parameter count matches a ticket's.

Zhu & Gupta 2017 ("To prune, or not to prune") compare large-sparse against small-dense networks of
equal non-zero parameter count; here the width multiplier ``model.width`` is searched so the dense
count is as close as possible to the target.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..models import ACTIVATIONS, MLP, build_model, param_count, structure_of


@lru_cache(maxsize=4096)
def count_at_width(cfg: ModelConfig, width: float, num_classes: int, input_shape: tuple[int, ...]) -> int:
    """Parameter count of ``cfg`` at ``width`` (shapes only, nothing allocated)."""
    model = build_model(dataclasses.replace(cfg, width=width), num_classes, input_shape)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    return param_count(shapes["params"])


def match_width(cfg: ModelConfig, num_classes: int, input_shape: Sequence[int], target: int,
                iters: int = 40) -> tuple[float, int]:
    """(width, parameter count) of the dense model closest to ``target`` parameters.

    The count grows monotonically with the width (up to rounding of layer sizes), so bisect on the
    width in [1e-4, cfg.width] and keep the best of the points visited.
    """
    shape = tuple(input_shape)
    lo, hi = 1e-4, cfg.width
    best = (cfg.width, count_at_width(cfg, cfg.width, num_classes, shape))
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = count_at_width(cfg, mid, num_classes, shape)
        if abs(n - target) < abs(best[1] - target):
            best = (mid, n)
        if n < target:
            lo = mid
        else:
            hi = mid
    return best


# ---------------------------------------------------------------------------- padded small-dense training

def pads_exactly(narrow, full, input_shape: Sequence[int]) -> bool:
    """Whether the small-dense model ``narrow`` can train inside the full-width model ``full``: a chain of
    dense layers (with or without ReLU, no norm, no dropout, no batch statistics) whose every parameter
    is a leading block of ``full``'s (same tree, each dimension at most ``full``'s).

    There a hidden unit whose incoming weights and bias are zero outputs ``relu(0) = 0`` and its outgoing
    weights are zero, so the padded network computes the narrow one's logits; with those weights masked
    (zero gradient, zero Adam moments, zero update: :mod:`lth.train`) it stays so through training. The
    two differ only in float rounding (a longer dot product adds exact zeros in another order: ~1e-8 on
    the weights, tests/prune/test_small_dense_padded.py). Convolutions are left out: a flatten after a
    conv interleaves channels, so a narrow fc kernel is not a leading block of the wide one.
    """
    chains = [structure_of(m).chain for m in (narrow, full)]
    if any(c is None or any(op["op"] not in ("flatten", "dense") or "norm" in op for op in c) for c in chains):
        return False
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)  # shapes only: nothing runs or compiles
    shapes = [jax.eval_shape(lambda x, m=m: m.init(jax.random.key(0), x, train=False), x) for m in (narrow, full)]
    if any(set(s) - {"params", ACTIVATIONS} for s in shapes):  # batch statistics or other state
        return False
    small, big = (s["params"] for s in shapes)
    if jax.tree.structure(small) != jax.tree.structure(big):
        return False
    return all(len(a.shape) == len(b.shape) and all(i <= j for i, j in zip(a.shape, b.shape))
               for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(big)))


def _block(shape) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def pad_params(narrow_params, full_shapes):
    """``(padded, live)``: each narrow leaf written into the leading block of a zero array shaped as its
    ``full_shapes`` leaf (numpy, on the host), and the mask that is True exactly on that block. A leading
    population axis ``[K, ...]`` of the narrow leaves (absent from ``full_shapes``) is kept."""
    def full(x, s):  # the population axis of x, if any, then the full leaf's shape
        return tuple(np.shape(x)[:np.ndim(x) - len(s.shape)]) + tuple(s.shape)

    def pad(x, s):
        x = np.asarray(x)
        out = np.zeros(full(x, s), x.dtype)
        out[_block(x.shape)] = x
        return out

    def live(x, s):
        out = np.zeros(full(x, s), bool)
        out[_block(np.shape(x))] = True
        return out

    return jax.tree.map(pad, narrow_params, full_shapes), jax.tree.map(live, narrow_params, full_shapes)


def unpad_params(padded, narrow_shapes):
    """The leading blocks of ``padded`` with the shapes of ``narrow_shapes`` (host numpy): the narrow
    network a padded small-dense model trained. A leading population axis of ``padded`` is kept."""
    def cut(x, s):
        x = np.asarray(x)
        return x[(slice(None),) * (x.ndim - len(s.shape)) + _block(s.shape)]

    return jax.tree.map(cut, padded, narrow_shapes)


# ---------------------------------------------------------------------------- the narrow init, without its program

# The variance-scaling truncated-normal inits of lth.models.INITS: name -> (scale, mode) (Glorot & Bengio 2010:
# Var = 1 / fan_avg; He et al. 2015: Var = 2 / fan_in), drawn as N(0, 1) truncated to (-2, 2) times
# sqrt(Var) / 0.87962566103423978 (the standard deviation of that truncated normal).
VARIANCE_SCALING = {"glorot_normal": (1.0, "fan_avg"), "kaiming_normal": (2.0, "fan_in")}
TRUNCATED_STD = 0.87962566103423978


def _unit_truncated_normal(key, shape, dtype=jnp.float32):
    """The unscaled draw of the inits above: N(0, 1) truncated to (-2, 2)."""
    return jax.random.truncated_normal(key, -2, 2, shape, dtype)


def _stddev(shape, scheme: str) -> np.float32:
    """The init's standard deviation of a dense kernel ``[fan_in, fan_out]``, in float32 as jax computes it
    (``sqrt(float32(scale / denominator)) / float32(0.8796...)``; XLA folds those constants exactly)."""
    scale, mode = VARIANCE_SCALING[scheme]
    fan_in, fan_out = float(shape[-2]), float(shape[-1])
    denominator = (fan_in + fan_out) / 2 if mode == "fan_avg" else fan_in
    return np.sqrt(np.float32(scale / denominator)) / np.float32(TRUNCATED_STD)


def narrow_init(narrow, full, keys, input_shape: Sequence[int]):
    """The params ``[K, ...]`` ``init_population(narrow, keys)`` gives, computed from the full-width
    model's program: None where this does not apply (then compile the narrow init).

    A padded small-dense member (:func:`pads_exactly`) needs its narrow network's own init, a program of
    its own at every new width. With jax's partitionable threefry (``jax_threefry_partitionable``, the
    default) the random bits of an array are a function of each element's flat index, so the truncated
    normal of a kernel ``[a, b]`` is the first ``a * b`` values of the one of any longer flat array drawn
    with the same key; a parameter's key depends on its module path only, not on its shape. So the
    full-width model with unscaled kernels (:func:`_unit_truncated_normal`) gives every width's noise in
    one program; each narrow kernel is its leading ``a * b`` values times its own standard deviation
    (:func:`_stddev`, multiplied in float32 on the host: the same IEEE product), biases are zeros.
    Bit-identical to the narrow program for the inits of :data:`VARIANCE_SCALING`
    (``tests/prune/test_narrow_init.py``).
    """
    from ..train import init_population  # (lth.train imports this package)

    scheme = getattr(full, "init_scheme", None)
    if (not jax.config.jax_threefry_partitionable or not isinstance(full, MLP) or not isinstance(narrow, MLP)
            or scheme not in VARIANCE_SCALING or narrow.init_scheme != scheme
            or not pads_exactly(narrow, full, input_shape)):
        return None  # (a registered model may build its layers otherwise: only lth's MLP is known to draw so)
    noise, stats = init_population(full.clone(init_scheme=_unit_truncated_normal), keys, input_shape)
    if jax.tree.leaves(stats):
        return None
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    shapes = jax.eval_shape(lambda x: narrow.init(jax.random.key(0), x, train=False), x)["params"]
    noise = jax.device_get(noise)

    def leaf(path, full_leaf, shape):
        name = getattr(path[-1], "key", None)
        k, n = full_leaf.shape[0], math.prod(shape.shape)
        if name == "kernel" and len(shape.shape) == 2:
            return full_leaf.reshape(k, -1)[:, :n].reshape(k, *shape.shape) * _stddev(shape.shape, scheme)
        if name == "bias" and not np.any(full_leaf):
            return np.zeros((k, *shape.shape), full_leaf.dtype)
        raise _NotNarrowable

    try:
        return jax.tree_util.tree_map_with_path(leaf, noise, shapes)
    except _NotNarrowable:
        return None


class _NotNarrowable(Exception):
    """A parameter narrow_init does not know how to draw (then the narrow program is compiled)."""

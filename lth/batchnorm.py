"""Batch norm with a one-pass forward and a hand-written backward (the CPU path of lth's models).

:class:`FusedBatchNorm` is a drop-in for ``flax.linen.BatchNorm`` as lth's models use it (features on
the last axis, ``momentum``, ``epsilon``, scale and bias): the same variables (params ``scale`` ones and
``bias`` zeros, ``batch_stats`` ``mean`` zeros and ``var`` ones, shape ``[C]``), the same running
average update ``m * S + (1 - m) * batch_stat`` (none while initializing), the same statistics (the
biased variance ``max(0, E[x^2] - E[x]^2)``, flax's default), so stored runs load unchanged and run
ids do not move. Only the arithmetic is arranged differently:

- forward: the two sums (of x and x^2) in one pass, then one multiply-add per element with the affine
  folded in, ``y = x * a + b`` with ``a = scale / sqrt(var + eps)``, ``b = bias - mean * a``;
- backward (Ioffe & Szegedy 2015, Sec. 3, with xhat = (x - mean) / sqrt(var + eps)):
  ``dbias = sum dy``, ``dscale = sum dy * xhat`` (two sums in one pass, taken on x, not on xhat),
  ``dx = a * (dy - dbias / M - xhat * dscale / M)`` as one multiply-add per element
  ``dx = dy * a + x * k + k0``, M the number of reduced elements per channel.

jax's autodiff of flax's batch norm keeps more intermediates and runs more elementwise passes; on the
CPU these passes are memory-bound (docs/notes/convspeed2.md).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _sums(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per channel (last axis): ``(sum y, sum x * y)``."""
    axes = tuple(range(x.ndim - 1))
    return jnp.sum(y, axes), jnp.sum(x * y, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Train-mode batch norm over every axis but the last: ``x [..., C] -> (y [..., C], mean [C], var [C])``
    with the batch statistics (biased variance) that the running averages are updated with."""
    m = x.size // x.shape[-1]
    s1, s2 = _sums(x, x)
    mean = s1 / m
    var = jnp.maximum(0.0, s2 / m - mean * mean)
    a = scale * jax.lax.rsqrt(var + epsilon)
    return x * a + (bias - mean * a), mean, var


def _train_fwd(x, scale, bias, epsilon):
    y, mean, var = batch_norm_train(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)


def _train_bwd(epsilon, res, cts):
    x, scale, mean, var = res
    dy, dmean, dvar = cts
    m = x.size // x.shape[-1]
    inv = jax.lax.rsqrt(var + epsilon)
    dbias, dyx = _sums(x, dy)
    dscale = inv * (dyx - mean * dbias)  # sum dy * xhat
    a = scale * inv
    # dx = a * (dy - dbias/M - xhat * dscale/M), plus the statistics' own cotangents:
    # d mean / dx = 1/M, d var / dx = 2 (x - mean) / M
    k = 2 * dvar / m - a * inv * dscale / m
    k0 = dmean / m - a * dbias / m - k * mean
    return dy * a + x * k + k0, dscale, dbias


batch_norm_train.defvjp(_train_fwd, _train_bwd)


class FusedBatchNorm(nn.Module):
    """``flax.linen.BatchNorm(use_running_average, momentum, epsilon)`` on the last axis, computed by
    :func:`batch_norm_train` in training mode (same variables, same results to float rounding)."""

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            a = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
            return x * a + (bias - ra_mean.value * a)
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y

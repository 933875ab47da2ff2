"""LSQ (Esser et al. 2020) gradients at the ends of the quantization range, against Eq. 3 written out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.quant import lsq_fake_quant, qrange


def _paper(v, lo, hi):
    """Eq. 3 of Esser et al. 2020 for ``v = x / s`` and the integer ends ``lo = -Qn``, ``hi = Qp``:
    (d x_hat / d x, d x_hat / d s). Inside ``lo < v < hi``: (1, round(v) - v), half to even; at or
    beyond an end: (0, that end)."""
    v = np.asarray(v, np.float64)
    inside = (v > lo) & (v < hi)
    dx = np.where(inside, 1.0, 0.0)
    ds = np.where(inside, np.round(v) - v, np.where(v <= lo, lo, hi))
    return dx, ds


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_lsq_gradients_at_the_ends_of_the_range_follow_eq_3(bits, scheme):
    s, g = 0.5, 0.25  # a power of two: x / s is exact in float32; g: the gradient scale
    qmin, qmax = qrange(bits, scheme)
    z = 0.0 if scheme == "sym" else float(2 ** (bits - 2))  # asym: a zero point inside the range
    lo, hi = qmin - z, qmax - z
    # the windows where round(v) lands on an end (|v - end| < 1/2), both sides of each end, the ends
    # themselves, a point well inside and points well outside
    offsets = np.array([-0.45, -0.3, -0.1, 0.0, 0.1, 0.3, 0.45, -1.7, 1.7])
    v = np.concatenate([hi + offsets, lo + offsets, [0.5 * (lo + hi) + 0.2]])
    x = jnp.asarray(v * s, jnp.float32)
    v = np.asarray(x, np.float64) / s  # the float32 points exactly (s is a power of two)
    dx = jax.vmap(jax.grad(lambda xi: lsq_fake_quant(xi, jnp.log(s), z, bits, scheme, g)))(x)
    dls = jax.vmap(lambda xi: jax.grad(lambda ls: lsq_fake_quant(xi, ls, z, bits, scheme, g))(jnp.log(s)))(x)
    want_dx, want_ds = _paper(v, lo, hi)
    np.testing.assert_array_equal(np.asarray(dx), want_dx)
    # d/dlog s = (d/ds) * s * g: the scale is exp(log s) and its gradient is scaled by g
    np.testing.assert_allclose(np.asarray(dls) / (s * g), want_ds, rtol=1e-5, atol=1e-6)
    # the forward value is unchanged: clip(round(x / s) + Z, qmin, qmax) dequantized
    q = np.clip(np.round(v) + z, qmin, qmax)
    np.testing.assert_array_equal(np.asarray(lsq_fake_quant(x, jnp.log(s), z, bits, scheme, g)),
                                  np.asarray((q - z) * s, np.float32))


def test_lsq_issue_example_2_bit_sym():
    """2-bit sym (ternary), x = 0.45, s = 0.5: v = 0.9 rounds to the end 1 but lies inside, so
    d/ds = round(0.9) - 0.9 = 0.1 (times the gradient scale) and d/dx = 1 (rounding first and
    clipping the code gave 0.55 and 0.5)."""
    g = 1 / np.sqrt(9 * 1)  # N = 9 weights per scale, Qp = 1
    f = lambda x, ls: lsq_fake_quant(x, ls, 0.0, 2, "sym", g)
    dx, dls = jax.grad(f, argnums=(0, 1))(jnp.float32(0.45), jnp.log(jnp.float32(0.5)))
    assert float(dx) == 1.0
    assert float(dls) / 0.5 == pytest.approx(0.1 * g, rel=1e-5)

"""Pure numerics of quantization: the quantizer, its straight-through and learned-step variants,
range calibration and :class:`QuantSpec` (jnp only; no models, no data).

The quantizer (Jacob et al. 2018, Eq. 1: ``r = S (q - Z)``)::

    q = clip(round(r / S) + Z, qmin, qmax)        r_hat = S (q - Z)

- ``sym``: signed integers ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (narrow range), ``Z = 0``,
  ``S = max(|lo|, |hi|) / qmax``; 2 bits is ternary {-1, 0, 1}.
- ``asym``: unsigned integers ``[0, 2^b - 1]``, ``S = (hi - lo) / (2^b - 1)``, ``Z = round(-lo / S)``.
  The range is first widened to contain 0 and Z is an integer, so real 0 is exactly ``q = Z``.
- 1 bit is binary: ``r_hat = S sign(r)`` (``sign(0) = 0``), ``S = mean |r|`` of the non-zero entries
  (the L2-optimal binary scale, Rastegari et al. 2016), whatever the scheme.

So a pruned weight (exact 0.0) stays exactly 0.0 after quantize -> dequantize, for every bit width,
scheme and granularity: the mask survives PTQ and QAT without special cases.

**Traced bit widths.** ``bits`` is a Python int, a compile-time constant: a jitted program per bit
width. Passing ``grid = grid_of(bits, scheme)`` (``{"qmin", "qmax"}`` as float32 arrays) makes the
integer range a traced value instead, so one program serves every multi-bit width (``bits`` then
only says binary or not: 1 keeps its own path). The arithmetic is the same IEEE float32 operations
on the same values, so the results are bit-identical to the constant path
(``tests/quant/test_traced_bits.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
QParams = dict  # {"scale": array, "zero_point": array}

from ..config import QUANT_BITS as BITS
from ..config import QUANT_CALIBRATIONS as CALIBRATIONS
from ..config import QUANT_GRANULARITIES as GRANULARITIES
from ..config import QUANT_SCHEMES as SCHEMES

MSE_GRID = 48  # clipping ratios tried by the MSE range search


# ============================================================================ the quantizer

def qrange(bits: int, scheme: str) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-bit ``scheme`` quantizer (binary: (-1, 1))."""
    _check_bits_scheme(bits, scheme)
    if bits == 1:
        return -1, 1
    if scheme == "sym":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def grid_of(bits: int, scheme: str) -> dict:
    """The integer range of a multi-bit quantizer as data, the ``grid`` argument of the functions below
    (one compiled program for every bit width): float32 scalars (host numpy) ``qmin``, ``qmax`` and the
    reciprocal of the scale's divisor, ``inv_span`` (``1 / qmax`` sym, ``1 / (qmax - qmin)`` asym).

    The reciprocal is there because XLA compiles a division by a constant as a multiplication by its
    float32 reciprocal (and a division by a traced value otherwise, which differs in the last bit), so
    the traced path multiplies by the same reciprocal, computed here in float32."""
    qmin, qmax = qrange(bits, scheme)
    if bits == 1:
        raise ValueError("grid_of: binary (bits = 1) has no integer grid; it keeps its own program")
    span = qmax if scheme == "sym" else qmax - qmin
    return {"qmin": np.float32(qmin), "qmax": np.float32(qmax), "inv_span": np.float32(1) / np.float32(span)}


def _bounds(bits: int, scheme: str, grid: dict | None):
    """``(qmin, qmax)``: the traced ``grid``'s when given, else the constants of ``bits``."""
    return qrange(bits, scheme) if grid is None else (grid["qmin"], grid["qmax"])


def _check_bits_scheme(bits: int, scheme: str, of: str = "") -> None:
    """ValueError naming the setting (``of = "act_"``: the activations') unless bits and scheme exist."""
    allowed = [b for b in BITS if not of or b > 1]  # no binary activations
    if bits not in allowed:
        what = "activation" if of else "weight"
        raise ValueError(f"{of}bits = {bits!r} is not supported ({what} bits); allowed: {', '.join(map(str, allowed))}")
    if scheme not in SCHEMES:
        raise ValueError(f"{of}scheme = {scheme!r} is not supported; allowed: {', '.join(SCHEMES)}")


def scale_zero_point(lo, hi, bits: int, scheme: str, grid: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """Scale S and (integer-valued, float32) zero point Z for the real range ``[lo, hi]``.

    The range is widened to contain 0 first (so Z is in ``[qmin, qmax]`` and real 0 is exactly
    representable). An all-zero range (a fully pruned channel) gets S = 1, Z = 0 (or qmin).
    Not for 1 bit: the binary scale is not a range (see :func:`calibrate`). ``grid``: the traced range
    (:func:`grid_of`) instead of ``bits``'.
    """
    qmin, qmax = _bounds(bits, scheme, grid)
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    if scheme == "sym":
        scale = jnp.maximum(-lo, hi) / qmax if grid is None else jnp.maximum(-lo, hi) * grid["inv_span"]
        zero_point = jnp.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin) if grid is None else (hi - lo) * grid["inv_span"]
        safe = jnp.where(scale > 0, scale, 1.0)
        zero_point = jnp.clip(jnp.round(qmin - lo / safe), qmin, qmax)
    scale = jnp.where(scale > 0, scale, 1.0)
    return scale.astype(jnp.float32), zero_point.astype(jnp.float32)


def quantize(x, scale, zero_point, bits: int, scheme: str, grid: dict | None = None) -> jax.Array:
    """Integer codes ``clip(round(x / S) + Z, qmin, qmax)`` (binary: ``sign(x)``), as float32."""
    if bits == 1:
        return jnp.sign(x).astype(jnp.float32)
    qmin, qmax = _bounds(bits, scheme, grid)
    return jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q, scale, zero_point) -> jax.Array:
    """Real values ``S (q - Z)``; ``q = Z`` gives exactly 0.0."""
    return (q - zero_point) * scale


def representable_range(scale, zero_point, bits: int, scheme: str,
                         grid: dict | None = None) -> tuple[jax.Array, jax.Array]:
    """``[(qmin - Z) S, (qmax - Z) S]``: inside it the quantization error is at most S / 2."""
    qmin, qmax = _bounds(bits, scheme, grid)
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def fake_quant(x, scale, zero_point, bits: int, scheme: str, grid: dict | None = None) -> jax.Array:
    """``dequantize(quantize(x))`` with a straight-through estimator (Bengio et al. 2013).

    The gradient w.r.t. ``x`` is the identity inside :func:`representable_range` and zero outside
    (clipped values); ``scale`` and ``zero_point`` get no gradient (fixed ranges). ``grid``: the
    traced integer range (:func:`grid_of`) instead of ``bits``' constants (not for 1 bit).
    """
    if grid is None or bits == 1:
        return _fake_quant(x, scale, zero_point, bits, scheme)
    return _fake_quant_grid(x, scale, zero_point, grid["qmin"], grid["qmax"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, scale, zero_point, bits: int, scheme: str) -> jax.Array:
    return dequantize(quantize(x, scale, zero_point, bits, scheme), scale, zero_point)


def _fake_quant_fwd(x, scale, zero_point, bits, scheme):
    return _fake_quant(x, scale, zero_point, bits, scheme), (x, scale, zero_point)


def _fake_quant_bwd(bits, scheme, res, g):
    x, scale, zero_point = res
    lo, hi = representable_range(scale, zero_point, bits, scheme)
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale), jnp.zeros_like(zero_point)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


@jax.custom_vjp
def _fake_quant_grid(x, scale, zero_point, qmin, qmax) -> jax.Array:
    """:func:`_fake_quant` with the integer range traced: the same operations on the same values."""
    grid = {"qmin": qmin, "qmax": qmax}
    return dequantize(quantize(x, scale, zero_point, 2, "", grid), scale, zero_point)


def _fake_quant_grid_fwd(x, scale, zero_point, qmin, qmax):
    return _fake_quant_grid(x, scale, zero_point, qmin, qmax), (x, scale, zero_point, qmin, qmax)


def _fake_quant_grid_bwd(res, g):
    x, scale, zero_point, qmin, qmax = res
    lo, hi = representable_range(scale, zero_point, 2, "", {"qmin": qmin, "qmax": qmax})
    inside = (x >= lo) & (x <= hi)
    return (jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale), jnp.zeros_like(zero_point),
            jnp.zeros_like(qmin), jnp.zeros_like(qmax))


_fake_quant_grid.defvjp(_fake_quant_grid_fwd, _fake_quant_grid_bwd)


def _round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _scale_grad(x, g):
    """Identity forward, gradient times g (LSQ's gradient scale)."""
    return jax.lax.stop_gradient(x - x * g) + x * g


def lsq_fake_quant(x, log_scale, zero_point, bits: int, scheme: str, grad_scale: float = 1.0,
                   grid: dict | None = None) -> jax.Array:
    """Fake quantization with a learned step size (LSQ, Esser et al. 2020, Eq. 1-3).

    The scale is ``exp(log_scale)`` (trained in the log domain as in TQT, Jain et al. 2019, so an
    Adam step is a relative change and the scale stays positive). As in the paper, ``v = x / s`` is
    clipped in the real domain to ``(qmin - Z, qmax - Z)``, then rounded with a straight-through
    round, so the gradients are Eq. 3's: ``x`` gets 1 strictly inside the range and 0 on or outside
    its ends; the scale gets ``round(x/s) - x/s`` inside and ``qmin - Z`` / ``qmax - Z`` at or
    beyond the ends, times ``grad_scale`` (the caller passes LSQ's ``1 / sqrt(N Qp)``). Rounding
    first and clipping the code would split the gradient 50/50 wherever the rounded code lands on an
    end (``jnp.clip`` at a tie): a third of the elements at 2 bits. The forward value is the same
    either way (the ends are integers). ``zero_point`` is a constant (0 stays exactly 0). ``grid``:
    the traced integer range (:func:`grid_of`; ``grad_scale`` may then be a traced float32 too).
    """
    s = jnp.exp(_scale_grad(log_scale, grad_scale))
    zero_point = jax.lax.stop_gradient(zero_point)
    if bits == 1:
        v = jnp.clip(x / s, -1.0, 1.0)
        q = v + jax.lax.stop_gradient(jnp.sign(x) - v)
        return q * s
    qmin, qmax = _bounds(bits, scheme, grid)
    lo, hi = qmin - zero_point, qmax - zero_point  # integer ends of v = x / s
    v = x / s
    inside = (v > lo) & (v < hi)
    # where, not jnp.clip: outside the open range the end is a constant (no gradient through v)
    v = jnp.where(inside, v, jnp.where(v <= lo, lo, hi))
    return _round_ste(v) * s


# ============================================================================ calibration

def _rows(x, granularity: str):
    """``[N, C]`` view: C = last axis (per channel) or 1 (per tensor)."""
    x = jnp.asarray(x)
    if granularity == "channel":
        return x.reshape(-1, x.shape[-1])
    return x.reshape(-1, 1)


def _range_error(rows, valid, lo, hi, bits, scheme, grid=None):
    """Mean squared quantization error per column for ranges ``[lo, hi]`` (valid entries only)."""
    scale, zp = scale_zero_point(lo, hi, bits, scheme, grid)
    err = (fake_quant(rows, scale, zp, bits, scheme, grid) - rows) ** 2
    return jnp.sum(jnp.where(valid, err, 0.0), 0) / jnp.maximum(jnp.sum(valid, 0), 1)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def calibrate(x, valid, bits: int, scheme: str, method: str, granularity: str,
              percentile: float = 99.99, grid: dict | None = None) -> QParams:
    """Quantizer of ``x`` from its ``valid`` entries (pruned zeros are exact whatever the range).

    Methods: ``minmax`` (the observed range), ``percentile`` (clip outliers at the
    ``100 - p`` / ``p`` percentiles), ``mse`` (search clipping ratios ``a`` of the min-max range
    ``[a lo, a hi]`` for the least mean squared error, per column). Binary (1 bit) always uses
    ``S = mean |x|`` of the valid entries. Traceable (used inside QAT steps).
    Returns ``{"scale", "zero_point"}`` of shape ``[C]`` (per channel) or ``[]`` (per tensor).
    ``grid`` (a traced argument): the integer range of :func:`grid_of` instead of ``bits``' constants.
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration = {method!r} is not supported; allowed: {', '.join(CALIBRATIONS)}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity = {granularity!r} is not supported; allowed: {', '.join(GRANULARITIES)}")
    rows = _rows(x, granularity).astype(jnp.float32)
    valid = _rows(jnp.broadcast_to(valid, jnp.shape(x)), granularity)
    count = jnp.sum(valid, 0)
    if bits == 1:
        _check_bits_scheme(bits, scheme)
        scale = jnp.sum(jnp.where(valid, jnp.abs(rows), 0.0), 0) / jnp.maximum(count, 1)
        scale = jnp.where(scale > 0, scale, 1.0)
        qp = {"scale": scale, "zero_point": jnp.zeros_like(scale)}
        return _squeeze(qp, granularity)
    lo = jnp.where(count > 0, jnp.min(jnp.where(valid, rows, jnp.inf), 0), 0.0)
    hi = jnp.where(count > 0, jnp.max(jnp.where(valid, rows, -jnp.inf), 0), 0.0)
    if method == "percentile":
        masked = jnp.where(valid, rows, jnp.nan)
        plo = jnp.nanpercentile(masked, 100.0 - percentile, axis=0)
        phi = jnp.nanpercentile(masked, percentile, axis=0)
        lo, hi = jnp.where(count > 0, plo, 0.0), jnp.where(count > 0, phi, 0.0)
    elif method == "mse":
        alphas = jnp.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID)
        errs = jax.lax.map(lambda a: _range_error(rows, valid, a * lo, a * hi, bits, scheme, grid), alphas)
        best = alphas[jnp.argmin(errs, axis=0)]  # argmin takes the first (smallest clip) on ties
        lo, hi = best * lo, best * hi
    scale, zp = scale_zero_point(lo, hi, bits, scheme, grid)
    return _squeeze({"scale": scale, "zero_point": zp}, granularity)


def _squeeze(qp: QParams, granularity: str) -> QParams:
    return qp if granularity == "channel" else {k: v.reshape(()) for k, v in qp.items()}


# ============================================================================ spec

@dataclass(frozen=True)
class QuantSpec:
    """One quantization setting of weights (and optionally activations)."""

    bits: int = 8
    scheme: Literal["sym", "asym"] = "sym"
    granularity: Literal["channel", "tensor"] = "channel"
    calibration: Literal["minmax", "percentile", "mse"] = "minmax"
    act_bits: int | None = None  # None: weights only
    act_scheme: Literal["sym", "asym"] = "asym"
    act_calibration: str | None = None  # default: the weights' calibration
    percentile: float = 99.99

    def __post_init__(self):
        _check_bits_scheme(self.bits, self.scheme)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity = {self.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        for c in (self.calibration, self.act_calibration or self.calibration):
            if c not in CALIBRATIONS:
                raise ValueError(f"calibration = {c!r}; allowed: {', '.join(CALIBRATIONS)}")
        if self.act_bits is not None:
            _check_bits_scheme(self.act_bits, self.act_scheme, "act_")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile = {self.percentile!r}; expected a number in (50, 100]")

    @property
    def scheme_name(self) -> str:
        return "binary" if self.bits == 1 else self.scheme

    def replace(self, **kw) -> "QuantSpec":
        return dataclasses.replace(self, **kw)


"""Quantizing tickets: the quantizer, calibration, PTQ (+ bias correction, cross-layer equalization)
and QAT (fixed ranges or learned scale) on top of the masked training engine.

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

Weights are quantized per tensor or per output channel (the last axis of a Dense/Conv kernel);
activations per tensor at the input of every ``nn.Dense``/``nn.Conv`` (via
:func:`flax.linen.intercept_methods`), so the model code is never touched. Biases and batch-norm
parameters stay float (the integer path of :mod:`lth.intinfer` adds biases as int32).

Pytrees used here (``K`` = population axis, where stacked):

- ``weight_qparams`` / ``act_qparams``: ``{layer: {"scale", "zero_point"}}`` keyed by the layer's
  module path (``"dense_0"``, ``"stage1_block0/conv_0"``); weight scales are ``[C]`` (per channel)
  or ``[]`` (per tensor); activation scales are ``[]``.
- :class:`FakeQuantModel` variables: ``{"params": {"net": params[, "lsq": {"w": .., "a": ..}]},
  "batch_stats": {"net": batch_stats, "quant": {"acts": act_qparams, "w_zero_point": {..}}}}``.
  Constants (zero points, fixed ranges) sit in ``batch_stats`` so the optimizer never sees them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from .models import MLP, ConvNet, layer_kind

PyTree = Any
QParams = dict  # {"scale": array, "zero_point": array}

BITS = (8, 4, 3, 2, 1)
SCHEMES = ("sym", "asym")
GRANULARITIES = ("channel", "tensor")
CALIBRATIONS = ("minmax", "percentile", "mse")
METHODS = ("ptq", "qat")
QUANT_LAYERS = (nn.Dense, nn.Conv)
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


def _check_bits_scheme(bits: int, scheme: str) -> None:
    if bits not in BITS:
        raise ValueError(f"bits = {bits!r} is not supported; allowed: {', '.join(map(str, BITS))}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme = {scheme!r} is not supported; allowed: {', '.join(SCHEMES)}")


def scale_zero_point(lo, hi, bits: int, scheme: str) -> tuple[jax.Array, jax.Array]:
    """Scale S and (integer-valued, float32) zero point Z for the real range ``[lo, hi]``.

    The range is widened to contain 0 first (so Z is in ``[qmin, qmax]`` and real 0 is exactly
    representable). An all-zero range (a fully pruned channel) gets S = 1, Z = 0 (or qmin).
    Not for 1 bit: the binary scale is not a range (see :func:`calibrate`).
    """
    qmin, qmax = qrange(bits, scheme)
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    if scheme == "sym":
        scale = jnp.maximum(-lo, hi) / qmax
        zero_point = jnp.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = jnp.where(scale > 0, scale, 1.0)
        zero_point = jnp.clip(jnp.round(qmin - lo / safe), qmin, qmax)
    scale = jnp.where(scale > 0, scale, 1.0)
    return scale.astype(jnp.float32), zero_point.astype(jnp.float32)


def quantize(x, scale, zero_point, bits: int, scheme: str) -> jax.Array:
    """Integer codes ``clip(round(x / S) + Z, qmin, qmax)`` (binary: ``sign(x)``), as float32."""
    if bits == 1:
        return jnp.sign(x).astype(jnp.float32)
    qmin, qmax = qrange(bits, scheme)
    return jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q, scale, zero_point) -> jax.Array:
    """Real values ``S (q - Z)``; ``q = Z`` gives exactly 0.0."""
    return (q - zero_point) * scale


def representable_range(scale, zero_point, bits: int, scheme: str) -> tuple[jax.Array, jax.Array]:
    """``[(qmin - Z) S, (qmax - Z) S]``: inside it the quantization error is at most S / 2."""
    qmin, qmax = qrange(bits, scheme)
    return (qmin - zero_point) * scale, (qmax - zero_point) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fake_quant(x, scale, zero_point, bits: int, scheme: str) -> jax.Array:
    """``dequantize(quantize(x))`` with a straight-through estimator (Bengio et al. 2013).

    The gradient w.r.t. ``x`` is the identity inside :func:`representable_range` and zero outside
    (clipped values); ``scale`` and ``zero_point`` get no gradient (fixed ranges).
    """
    return dequantize(quantize(x, scale, zero_point, bits, scheme), scale, zero_point)


def _fake_quant_fwd(x, scale, zero_point, bits, scheme):
    return fake_quant(x, scale, zero_point, bits, scheme), (x, scale, zero_point)


def _fake_quant_bwd(bits, scheme, res, g):
    x, scale, zero_point = res
    lo, hi = representable_range(scale, zero_point, bits, scheme)
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale), jnp.zeros_like(zero_point)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _round_ste(x):
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _scale_grad(x, g):
    """Identity forward, gradient times g (LSQ's gradient scale)."""
    return jax.lax.stop_gradient(x - x * g) + x * g


def lsq_fake_quant(x, log_scale, zero_point, bits: int, scheme: str, grad_scale: float = 1.0) -> jax.Array:
    """Fake quantization with a learned step size (LSQ, Esser et al. 2020, Eq. 1-3).

    The scale is ``exp(log_scale)`` (trained in the log domain as in TQT, Jain et al. 2019, so an
    Adam step is a relative change and the scale stays positive). Gradients: ``x`` gets the
    straight-through identity inside the range and 0 outside; the scale gets LSQ's
    ``-x/s + round(x/s)`` inside and ``qmin - Z`` / ``qmax - Z`` outside, times ``grad_scale``.
    ``zero_point`` is a constant (0 stays exactly 0).
    """
    s = jnp.exp(_scale_grad(log_scale, grad_scale))
    zero_point = jax.lax.stop_gradient(zero_point)
    if bits == 1:
        v = jnp.clip(x / s, -1.0, 1.0)
        q = v + jax.lax.stop_gradient(jnp.sign(x) - v)
        return q * s
    qmin, qmax = qrange(bits, scheme)
    q = jnp.clip(_round_ste(x / s) + zero_point, qmin, qmax)
    return (q - zero_point) * s


# ============================================================================ calibration

def _rows(x, granularity: str):
    """``[N, C]`` view: C = last axis (per channel) or 1 (per tensor)."""
    x = jnp.asarray(x)
    if granularity == "channel":
        return x.reshape(-1, x.shape[-1])
    return x.reshape(-1, 1)


def _range_error(rows, valid, lo, hi, bits, scheme):
    """Mean squared quantization error per column for ranges ``[lo, hi]`` (valid entries only)."""
    scale, zp = scale_zero_point(lo, hi, bits, scheme)
    err = (fake_quant(rows, scale, zp, bits, scheme) - rows) ** 2
    return jnp.sum(jnp.where(valid, err, 0.0), 0) / jnp.maximum(jnp.sum(valid, 0), 1)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def calibrate(x, valid, bits: int, scheme: str, method: str, granularity: str,
              percentile: float = 99.99) -> QParams:
    """Quantizer of ``x`` from its ``valid`` entries (pruned zeros are exact whatever the range).

    Methods: ``minmax`` (the observed range), ``percentile`` (clip outliers at the
    ``100 - p`` / ``p`` percentiles), ``mse`` (search clipping ratios ``a`` of the min-max range
    ``[a lo, a hi]`` for the least mean squared error, per column). Binary (1 bit) always uses
    ``S = mean |x|`` of the valid entries. Traceable (used inside QAT steps).
    Returns ``{"scale", "zero_point"}`` of shape ``[C]`` (per channel) or ``[]`` (per tensor).
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
        errs = jax.lax.map(lambda a: _range_error(rows, valid, a * lo, a * hi, bits, scheme), alphas)
        best = alphas[jnp.argmin(errs, axis=0)]  # argmin takes the first (smallest clip) on ties
        lo, hi = best * lo, best * hi
    scale, zp = scale_zero_point(lo, hi, bits, scheme)
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
            _check_bits_scheme(self.act_bits, self.act_scheme)
            if self.act_bits == 1:
                raise ValueError("act_bits = 1 is not supported (binary activations); use 2..8")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile = {self.percentile!r}; expected a number in (50, 100]")

    @property
    def scheme_name(self) -> str:
        return "binary" if self.bits == 1 else self.scheme

    def replace(self, **kw) -> "QuantSpec":
        return dataclasses.replace(self, **kw)


# ============================================================================ params helpers

def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def layer_key(path) -> str:
    """Module path of a params leaf: ``"dense_0"``, ``"stage1_block0/conv_0"``."""
    return "/".join(_names(path)[:-1])


def is_weight(path, leaf) -> bool:
    """A Dense/Conv kernel (the quantized tensors)."""
    return layer_kind(path, leaf) in ("dense", "conv", "output")


def _get(tree: dict, key: str):
    for k in key.split("/"):
        tree = tree[k]
    return tree


def _set(tree: dict, key: str, leaf: str, value) -> dict:
    """Copy of a nested dict with ``tree[key...][leaf] = value`` (no in-place mutation)."""
    parts = key.split("/") if key else []

    def go(node, i):
        node = dict(node)
        if i == len(parts):
            node[leaf] = value
        else:
            node[parts[i]] = go(node[parts[i]], i + 1)
        return node

    return go(tree, 0)


@functools.partial(jax.jit, static_argnums=1)
def weight_qparams(params: PyTree, spec: QuantSpec) -> dict[str, QParams]:
    """Calibrated quantizer of every kernel (from its non-zero entries)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if is_weight(path, leaf):
            out[layer_key(path)] = calibrate(leaf, leaf != 0, spec.bits, spec.scheme, spec.calibration,
                                             spec.granularity, spec.percentile)
    return out


@functools.partial(jax.jit, static_argnums=2)
def quantize_weights(params: PyTree, qparams: dict[str, QParams], spec: QuantSpec) -> PyTree:
    """Params whose kernels are fake-quantized with ``qparams`` (STE); other leaves unchanged."""

    def f(path, leaf):
        if not is_weight(path, leaf):
            return leaf
        qp = qparams[layer_key(path)]
        return fake_quant(leaf, qp["scale"], qp["zero_point"], spec.bits, spec.scheme)

    return jax.tree_util.tree_map_with_path(f, params)


def weight_codes(params: PyTree, qparams: dict[str, QParams], spec: QuantSpec) -> dict[str, np.ndarray]:
    """Integer codes (int32 numpy, kernel-shaped) of every kernel."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if is_weight(path, leaf):
            qp = qparams[layer_key(path)]
            out[layer_key(path)] = np.asarray(quantize(leaf, qp["scale"], qp["zero_point"], spec.bits,
                                                       spec.scheme)).astype(np.int32)
    return out


# ============================================================================ fake-quant model

def _act_interceptor(quantize_input: Callable[[str, jax.Array], jax.Array]):
    """Interceptor rewriting the input of every Dense/Conv call as ``quantize_input(layer, x)``."""

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, QUANT_LAYERS) or not args:
            return next_fun(*args, **kwargs)
        key = "/".join(context.module.path)
        return next_fun(quantize_input(key, args[0]), *args[1:], **kwargs)

    return intercept


def _recorder(store: dict, outputs: bool = False):
    """Interceptor recording each Dense/Conv call's input (or output) by layer key, in call order."""

    def intercept(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, QUANT_LAYERS) or not args:
            return next_fun(*args, **kwargs)
        out = next_fun(*args, **kwargs)
        store["/".join(context.module.path)] = out if outputs else args[0]
        return out

    return intercept


@dataclass(frozen=True, eq=False)
class FakeQuantModel:
    """A stand-in for a Flax model whose ``apply`` runs ``base`` with quantized weights/activations.

    It has the ``apply(variables, x, train=..., mutable=...)`` signature the training engine uses,
    so :class:`lth.train.Engine` trains and evaluates it unchanged (QAT is ordinary masked training
    of this model). ``weights`` says how kernels are quantized in the forward pass:

    - ``"static"``: the params already hold quantized kernels (PTQ output); nothing is done;
    - ``"fixed"``: re-calibrated from the current weights at every call, STE gradients (QAT);
    - ``"lsq"``: learned log-scales in ``params["lsq"]["w"]`` (QAT with LSQ).

    Activations are quantized at the input of every Dense/Conv from
    ``batch_stats["quant"]["acts"]`` (or learned in ``params["lsq"]["a"]`` with ``"lsq"``) when
    ``spec.act_bits`` is set. See the module docstring for the variables layout.
    """

    base: Any
    spec: QuantSpec
    weights: Literal["static", "fixed", "lsq"] = "static"

    def net_params(self, params: dict, consts: dict) -> PyTree:
        """The base model's params as the forward pass sees them (kernels quantized)."""
        spec, net = self.spec, params["net"]
        if self.weights == "fixed":
            return quantize_weights(net, jax.lax.stop_gradient(weight_qparams(net, spec)), spec)
        if self.weights == "lsq":
            def f(path, leaf):
                if not is_weight(path, leaf):
                    return leaf
                key = layer_key(path)
                qmax = max(qrange(spec.bits, spec.scheme)[1], 1)
                n = leaf.size / (leaf.shape[-1] if spec.granularity == "channel" else 1)
                return lsq_fake_quant(leaf, params["lsq"]["w"][key], consts["w_zero_point"][key], spec.bits,
                                      spec.scheme, 1.0 / math.sqrt(n * qmax))
            return jax.tree_util.tree_map_with_path(f, net)
        return net

    def _quantize_input(self, params: dict, consts: dict):
        spec = self.spec
        acts = consts.get("acts", {})

        def q(key, x):
            if key not in acts:
                return x
            qp = acts[key]
            if self.weights == "lsq":
                qmax = qrange(spec.act_bits, spec.act_scheme)[1]
                n = x.size / x.shape[0]
                return lsq_fake_quant(x, params["lsq"]["a"][key], qp["zero_point"], spec.act_bits,
                                      spec.act_scheme, 1.0 / math.sqrt(n * qmax))
            return fake_quant(x, jax.lax.stop_gradient(qp["scale"]), jax.lax.stop_gradient(qp["zero_point"]),
                              spec.act_bits, spec.act_scheme)

        return q

    def apply(self, variables: dict, x, train: bool = False, mutable=False, **kw):
        params = variables["params"]
        bs = variables.get("batch_stats", {}) or {}
        consts = bs.get("quant", {})
        net_vars = {"params": self.net_params(params, consts)}
        has_bs = bool(jax.tree.leaves(bs.get("net", {})))
        if has_bs:
            net_vars["batch_stats"] = bs["net"]
        interceptor = _act_interceptor(self._quantize_input(params, consts))
        with nn.intercept_methods(interceptor):
            if mutable and has_bs:
                out, upd = self.base.apply(net_vars, x, train=train, mutable=["batch_stats"], **kw)
                return out, {"batch_stats": {**bs, "net": upd["batch_stats"]}}
            out = self.base.apply(net_vars, x, train=train, **kw)
        return (out, {"batch_stats": bs}) if mutable else out


def fake_quant_model(model, spec: QuantSpec, weights: str = "static") -> FakeQuantModel:
    """The (memoized, so compiled functions are reused) :class:`FakeQuantModel` of a base model."""
    return _cached(("fq", spec, weights), model, lambda: FakeQuantModel(model, spec, weights))


def _base_variables(params, batch_stats) -> dict:
    v = {"params": params}
    if jax.tree.leaves(batch_stats):
        v["batch_stats"] = batch_stats
    return v


# ============================================================================ activation calibration

_JIT_CACHE: dict = {}
_ENGINES: dict = {}


def _cached(kind, model, build: Callable[[], Any]) -> Any:
    """One compiled function per (kind, model); Flax modules compare by value, so a model rebuilt
    from the same config (another level, another call) reuses the compiled code."""
    key = (kind, model)
    if key not in _JIT_CACHE:
        if len(_JIT_CACHE) > 128:
            _JIT_CACHE.clear()
        _JIT_CACHE[key] = build()
    return _JIT_CACHE[key]


def collect_inputs(model, params, batch_stats, xs: np.ndarray, batch_size: int = 256,
                   max_values: int = 1 << 18) -> dict[str, dict]:
    """Per Dense/Conv layer: exact min/max of its input over ``xs`` and a uniform subsample.

    ``model`` may be a base model or a :class:`FakeQuantModel` (with its full variables in
    ``params``/``batch_stats``). Returns ``{layer: {"min", "max", "sample": 1-D array}}``.
    """
    def build():
        def run(p, b, x):
            store: dict = {}
            with nn.intercept_methods(_recorder(store)):
                if isinstance(model, FakeQuantModel):
                    model.apply({"params": p, "batch_stats": b}, x, train=False)
                else:
                    model.apply(_base_variables(p, b), x, train=False)
            return store

        return jax.jit(run)

    run = _cached("inputs", model, build)
    stats: dict[str, dict] = {}
    n_batches = max(1, math.ceil(len(xs) / batch_size))
    per_batch = max(1, max_values // n_batches)
    rng = np.random.default_rng(0)
    for i in range(n_batches):
        acts = jax.device_get(run(params, batch_stats, jnp.asarray(xs[i * batch_size:(i + 1) * batch_size])))
        for k, a in acts.items():
            a = np.asarray(a, np.float32).ravel()
            s = stats.setdefault(k, {"min": np.inf, "max": -np.inf, "sample": []})
            s["min"], s["max"] = min(s["min"], float(a.min())), max(s["max"], float(a.max()))
            s["sample"].append(a if a.size <= per_batch else rng.choice(a, per_batch, replace=False))
    for s in stats.values():
        s["sample"] = np.concatenate(s["sample"])
    return stats


def act_qparams(stats: dict[str, dict], spec: QuantSpec) -> dict[str, QParams]:
    """Per-tensor activation quantizers from :func:`collect_inputs` statistics."""
    method = spec.act_calibration or spec.calibration
    out = {}
    for k, s in stats.items():
        if method == "minmax":
            qp = scale_zero_point(s["min"], s["max"], spec.act_bits, spec.act_scheme)
            qp = {"scale": qp[0], "zero_point": qp[1]}
        else:
            x = jnp.asarray(s["sample"])
            qp = calibrate(x, jnp.ones_like(x, bool), spec.act_bits, spec.act_scheme, method, "tensor",
                           spec.percentile)
        out[k] = {"scale": jnp.asarray(qp["scale"], jnp.float32).reshape(()),
                  "zero_point": jnp.asarray(qp["zero_point"], jnp.float32).reshape(())}
    return out


# ============================================================================ PTQ

@dataclass
class QuantizedTicket:
    """One quantized network: kernels on their quantization grid (pruned weights exactly 0).

    ``params`` are float (dequantized) so any float code runs them; ``weight_qparams`` and
    ``act_qparams`` (empty: weights only) give the integer codes for export and integer inference.
    """

    spec: QuantSpec
    params: PyTree
    batch_stats: PyTree
    weight_qparams: dict[str, QParams]
    act_qparams: dict[str, QParams] = field(default_factory=dict)
    calibration: str = ""  # the calibration actually used (retry may change it)

    def variables(self) -> dict:
        """Variables of ``FakeQuantModel(base, spec, "static")``."""
        return {"params": {"net": self.params},
                "batch_stats": {"net": self.batch_stats, "quant": {"acts": self.act_qparams}}}

    def codes(self) -> dict[str, np.ndarray]:
        return weight_codes(self.params, self.weight_qparams, self.spec)


def ptq(model, params: PyTree, batch_stats: PyTree, spec: QuantSpec, calib_x: np.ndarray | None = None, *,
        bias_correction: bool = False, cle: bool = False) -> QuantizedTicket:
    """Post-training quantization of one network.

    1. optionally cross-layer equalization (:func:`equalize`, float function unchanged);
    2. weight quantizers from the weights (:func:`calibrate`), kernels fake-quantized;
    3. with ``spec.act_bits``: activation ranges from ``calib_x`` run through the weight-quantized
       network (:func:`collect_inputs`);
    4. optionally empirical bias correction on ``calib_x`` (:func:`bias_correct`);
    5. with activations, biases rounded to their int32 grid (:func:`round_biases`).
    """
    params = jax.tree.map(jnp.asarray, params)
    batch_stats = jax.tree.map(jnp.asarray, batch_stats)
    if cle:
        params = equalize(model, params)
    wq = weight_qparams(params, spec)
    qparams = quantize_weights(params, wq, spec)
    acts: dict = {}
    if spec.act_bits is not None:
        if calib_x is None:
            raise ValueError("activation quantization needs calibration data (calib_x)")
        acts = act_qparams(collect_inputs(model, qparams, batch_stats, calib_x), spec)
    qt = QuantizedTicket(spec, qparams, batch_stats, wq, acts, spec.calibration)
    if bias_correction:
        if calib_x is None:
            raise ValueError("bias correction needs calibration data (calib_x)")
        qt = bias_correct(model, params, batch_stats, qt, calib_x)
    return round_biases(qt)


def round_biases(qt: QuantizedTicket) -> QuantizedTicket:
    """Biases rounded to the int32 grid of their accumulator, ``S_x S_w`` (Jacob et al. 2018, Sec. 2.4).

    Integer inference adds the bias as ``round(b / (S_x S_w))`` to the int32 accumulator; rounding
    it here too makes the fake-quant model compute exactly what the integer model does (at 2 bits
    ``S_w`` is large and the difference would flip requantization roundings).
    """
    params = qt.params
    for key, aq in qt.act_qparams.items():
        try:
            bias = _get(params, key)["bias"]
        except KeyError:
            continue
        step = aq["scale"] * jnp.broadcast_to(qt.weight_qparams[key]["scale"], bias.shape)
        params = _set(params, key, "bias", jnp.round(bias / step) * step)
    return dataclasses.replace(qt, params=params)


def layer_outputs(model, variables: dict, xs: np.ndarray, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Mean output of every Dense/Conv (over all axes but the last) on ``xs``: ``{layer: [C]}``."""
    def build():
        def run(v, x):
            store: dict = {}
            with nn.intercept_methods(_recorder(store, outputs=True)):
                model.apply(v, x, train=False)
            return {k: jnp.sum(a.reshape(-1, a.shape[-1]), 0) / (a.size // a.shape[-1]) * x.shape[0]
                    for k, a in store.items()}

        return jax.jit(run)

    run = _cached("outputs", model, build)
    total: dict[str, np.ndarray] = {}
    for i in range(0, len(xs), batch_size):
        for k, s in jax.device_get(run(variables, jnp.asarray(xs[i:i + batch_size]))).items():
            total[k] = total.get(k, 0) + np.asarray(s, np.float64)
    return {k: (v / len(xs)).astype(np.float32) for k, v in total.items()}


def call_order(model, variables: dict, x) -> list[str]:
    """Layer keys of the Dense/Conv calls of one forward pass, in call order (traced, not run)."""
    order: list[str] = []

    def intercept(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, QUANT_LAYERS):
            order.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    def run(v, x):
        with nn.intercept_methods(intercept):
            return model.apply(v, x, train=False)

    jax.eval_shape(run, variables, jnp.asarray(x))
    return list(dict.fromkeys(order))


def bias_correct(model, float_params: PyTree, batch_stats: PyTree, qt: QuantizedTicket,
                 calib_x: np.ndarray) -> QuantizedTicket:
    """Empirical bias correction (Nagel et al. 2019, Sec. 4.2): remove the expected output shift.

    Layer by layer in call order, ``b <- b - (E[y_quant] - E[y_float])`` with the means taken over
    ``calib_x`` and all but the channel axis; each layer sees the already-corrected earlier layers,
    so the shift caused by every earlier quantization error is corrected too. Layers without bias
    are skipped.
    """
    fq = fake_quant_model(model, qt.spec, "static")
    float_vars = _base_variables(float_params, batch_stats)
    ref = layer_outputs(model, float_vars, calib_x)
    params = qt.params
    for key in call_order(model, float_vars, calib_x[:1]):
        try:
            bias = _get(params, key)["bias"]
        except KeyError:
            continue
        out = layer_outputs(fq, dataclasses.replace(qt, params=params).variables(), calib_x)
        params = _set(params, key, "bias", bias - jnp.asarray(out[key] - ref[key]))
    return dataclasses.replace(qt, params=params)


# ============================================================================ the layer program

def layer_program(model) -> list[dict]:
    """The forward pass of an MLP / ConvNet as a list of ops (for CLE and integer inference).

    Ops: ``{"op": "dense" | "conv", "layer": name, "relu": bool}``, ``{"op": "pool"}`` (2x2 max,
    stride 2), ``{"op": "flatten"}``. ValueError for other models (batch norm, residuals).
    """
    from .models import POOL, OUTPUT

    ops: list[dict] = []
    if isinstance(model, MLP):
        ops.append({"op": "flatten"})
        ops += [{"op": "dense", "layer": f"dense_{i}", "relu": True} for i in range(len(model.widths))]
    elif isinstance(model, ConvNet):
        i = 0
        for item in model.plan:
            if item == POOL:
                ops.append({"op": "pool"})
            else:
                ops.append({"op": "conv", "layer": f"conv_{i}", "relu": True})
                i += 1
        ops.append({"op": "flatten"})
        ops += [{"op": "dense", "layer": f"dense_{j}", "relu": True} for j in range(len(model.fc))]
    else:
        raise ValueError(f"{type(model).__name__}: cross-layer equalization and integer inference support "
                         "the mlp, lenet_300_100 and conv2/4/6 models (no batch norm, no residuals)")
    ops.append({"op": "dense", "layer": OUTPUT, "relu": False})
    return ops


def equalize(model, params: PyTree, iterations: int = 20) -> PyTree:
    """Cross-layer equalization (Nagel et al. 2019, Sec. 4.1, Eq. 10-11) of consecutive ReLU layers.

    For each pair (layer a + ReLU, next layer b), output channel i of a is divided by
    ``s_i = sqrt(r1_i / r2_i)`` (kernel column and bias) and the matching input rows of b are
    multiplied by it, where ``r1_i`` / ``r2_i`` are the max-abs ranges of a's channel i and of b's
    input channel i. ReLU (and max-pool, flatten) commute with positive per-channel scaling, so the
    float function is unchanged, and after convergence both ranges equal ``sqrt(r1_i r2_i)``.
    Zeros stay zeros, so masks are preserved. Runs on the host (numpy): a one-off transform.
    """
    ops = [o for o in layer_program(model) if o["op"] in ("dense", "conv")]
    params = jax.tree.map(lambda a: np.array(a, np.float32), params)
    for _ in range(iterations):
        for a, b in zip(ops[:-1], ops[1:]):
            la, lb = params[a["layer"]], params[b["layer"]]
            c = la["kernel"].shape[-1]
            # b's kernel as [.., C, out]: conv [kh, kw, C, out], or the rows of an NHWC flatten
            # (channel fastest), or a dense [C, out]
            wb3 = lb["kernel"].reshape(-1, c, lb["kernel"].shape[-1])
            r1 = np.abs(la["kernel"].reshape(-1, c)).max(0)
            r2 = np.abs(wb3).max((0, 2))
            ok = (r1 > 0) & (r2 > 0)
            s = np.where(ok, np.sqrt(r1 / np.where(ok, r2, 1.0)), 1.0).astype(np.float32)
            la["kernel"] = la["kernel"] / s
            la["bias"] = la["bias"] / s
            lb["kernel"] = (wb3 * s[None, :, None]).reshape(lb["kernel"].shape)
    return jax.tree.map(jnp.asarray, params)


# ============================================================================ QAT

def qat_variables(qt: QuantizedTicket, float_params: PyTree, learned_scale: bool) -> tuple[dict, dict]:
    """(params, batch_stats) of a QAT :class:`FakeQuantModel` started from float weights.

    ``qt`` (the PTQ of the same weights) gives the activation ranges, the weight zero points and,
    with ``learned_scale``, the initial scales (log domain).
    """
    params = {"net": float_params}
    consts = {"acts": qt.act_qparams,
              "w_zero_point": {k: v["zero_point"] for k, v in qt.weight_qparams.items()}}
    if learned_scale:
        params["lsq"] = {"w": {k: jnp.log(v["scale"]) for k, v in qt.weight_qparams.items()},
                         "a": {k: jnp.log(v["scale"]) for k, v in qt.act_qparams.items()}}
    return params, {"net": qt.batch_stats, "quant": consts}


def freeze_qat(model_params: dict, batch_stats: dict, spec: QuantSpec, learned_scale: bool) -> QuantizedTicket:
    """The :class:`QuantizedTicket` a QAT model computes (one member's final variables)."""
    consts = batch_stats["quant"]
    net = model_params["net"]
    if learned_scale:
        wq = {k: {"scale": jnp.exp(model_params["lsq"]["w"][k]), "zero_point": consts["w_zero_point"][k]}
              for k in consts["w_zero_point"]}
        acts = {k: {"scale": jnp.exp(model_params["lsq"]["a"][k]), "zero_point": v["zero_point"]}
                for k, v in consts["acts"].items()}
    else:
        wq = weight_qparams(net, spec)
        acts = consts["acts"]
    qparams = quantize_weights(net, wq, spec)
    return round_biases(QuantizedTicket(spec, qparams, batch_stats["net"], wq, acts, spec.calibration))


def qat(model, data, train_cfg, params: PyTree, batch_stats: PyTree, masks: PyTree, spec: QuantSpec,
        calib_x: np.ndarray, *, seeds: Sequence[int], steps: int, lr: float | None = None,
        learned_scale: bool = False, lr_fn=None) -> tuple[list[QuantizedTicket], list[dict]]:
    """Quantization-aware fine-tuning of a population ``[K, ...]`` with its masks kept fixed.

    Each member is PTQ-initialized (activation ranges, zero points, LSQ's initial scales), then
    :class:`lth.train.Engine` trains ``FakeQuantModel(model, spec, "lsq" | "fixed")`` for ``steps``
    steps: float master weights, fake-quantized forward, straight-through gradients, pruned
    weights' gradients zeroed and the weights re-zeroed after every update. ``lr`` (constant)
    or ``lr_fn`` sets the learning rate. Returns the frozen quantized members and the engine's
    metric records.
    """
    from .train import Engine, stack, unstack

    K = len(seeds)
    members_p, members_b = [], []
    for k in range(K):
        p, b = unstack(params, k), unstack(batch_stats, k)
        qt = ptq(model, p, b, spec, calib_x)
        qp, qb = qat_variables(qt, jax.tree.map(jnp.asarray, p), learned_scale)
        members_p.append(qp)
        members_b.append(qb)
    fq = fake_quant_model(model, spec, "lsq" if learned_scale else "fixed")
    cfg = dataclasses.replace(train_cfg, steps=int(steps), epochs=None, eval_every=int(steps))
    if lr_fn is None:
        # one engine (compiled programs) per (model, setting, data, steps, lr): levels of a sweep share it
        lr = float(lr if lr is not None else train_cfg.lr)
        key = (id(fq), id(data), cfg, lr)  # the cached engine keeps fq and data alive: ids stay unique
        if key not in _ENGINES:
            if len(_ENGINES) >= 2:  # each engine holds the train split on the device
                _ENGINES.clear()
            _ENGINES[key] = Engine(fq, data, cfg, lr_fn=optax.constant_schedule(lr))
        engine = _ENGINES[key]
    else:
        engine = Engine(fq, data, cfg, lr_fn=lr_fn)
    pop_p = stack(members_p)
    mask_tree = jax.tree.map(lambda m: jnp.asarray(m, bool), masks)
    full_masks = {"net": mask_tree}
    if learned_scale:
        full_masks["lsq"] = jax.tree.map(lambda x: jnp.ones(x.shape, bool), pop_p["lsq"])
    rngs = jax.vmap(jax.random.wrap_key_data)(jnp.stack(
        [jax.random.key_data(jax.random.fold_in(jax.random.key(int(s)), 7919)) for s in seeds]))
    state = engine.init(pop_p, stack(members_b), full_masks, rngs)
    result = engine.run(state, list(seeds))
    final_p = jax.device_get(result.state.params)
    final_b = jax.device_get(result.state.batch_stats)
    frozen = [freeze_qat(jax.tree.map(jnp.asarray, unstack(final_p, k)), jax.tree.map(jnp.asarray, unstack(final_b, k)),
                         spec, learned_scale) for k in range(K)]
    return frozen, result.records


# ============================================================================ evaluation

def fake_quant_predict(model, qt: QuantizedTicket, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class predictions ``[N]`` of the fake-quantized network ``qt``."""
    fq = fake_quant_model(model, qt.spec, "static")
    apply = _cached("predict", fq, lambda: jax.jit(lambda v, xb: jnp.argmax(fq.apply(v, xb), -1)))
    v = qt.variables()
    out = [np.asarray(apply(v, jnp.asarray(x[i:i + batch_size]))) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


class Evaluator:
    """Accuracy of populations of (fake-quantized or float) networks on the val and test splits."""

    def __init__(self, data, chunk: int = 1000):
        from .train import chunk_split

        self.sets = {name: chunk_split(x, y, chunk)
                     for name, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test))
                     if len(x)}

    @staticmethod
    def _fn(model):
        from .train import make_eval_fn

        return _cached("eval", model, lambda: make_eval_fn(model))

    def accuracy(self, model, params: PyTree, batch_stats: PyTree) -> dict[str, np.ndarray]:
        """split -> accuracy ``[K]`` of the stacked ``[K, ...]`` params/batch_stats."""
        fn = self._fn(model)
        return {name: np.asarray(fn(params, batch_stats, *s)[1]) for name, s in self.sets.items()}

    def quantized(self, model, qts: Sequence[QuantizedTicket],
                  fq: FakeQuantModel | None = None) -> dict[str, np.ndarray]:
        from .train import stack

        fq = fq or fake_quant_model(model, qts[0].spec, "static")
        v = stack([q.variables() for q in qts])
        return self.accuracy(fq, v["params"], v["batch_stats"])


# ============================================================================ settings

def _quant_config_class():
    """:class:`QuantConfig` built with lth.config's field helper (validated like every section)."""
    from .config import _f

    def _all(allowed):
        return (lambda v: len(v) >= 1 and all(x in allowed for x in v) and len(set(v)) == len(v),
                "a non-empty list of distinct values from " + ", ".join(map(str, allowed)))

    def spec(default, pair=None, **kw):
        if pair is not None:
            kw.update(check=pair[0], allowed=pair[1])
        return _f(default, **kw)

    @dataclass(frozen=True)
    class QuantConfig:
        """The ``[quant]`` settings of ``lth quantize`` (each list setting is swept)."""

        bits: tuple[int, ...] = spec((8, 4, 2), _all(BITS), doc="weight bit widths to sweep (1 = binary)")
        method: tuple[str, ...] = spec(("ptq",), _all(METHODS), doc="ptq and/or qat")
        scheme: tuple[str, ...] = spec(("sym",), _all(SCHEMES),
                                       doc="sym (signed, Z = 0) and/or asym (unsigned with zero point)")
        granularity: tuple[str, ...] = spec(("channel",), _all(GRANULARITIES),
                                            doc="weight scales per output channel and/or per tensor")
        calibration: tuple[str, ...] = spec(("minmax",), _all(CALIBRATIONS),
                                            doc="range methods to sweep (with retry: the order tried)")
        activations: bool = spec(True, doc="also quantize the input of every Dense/Conv (else weights only)")
        act_bits: int = spec(8, (lambda v: 2 <= v <= 8, "an integer in [2, 8]"), doc="activation bits")
        act_scheme: str = spec("asym", (lambda v: v in SCHEMES, "sym or asym"), doc="activation scheme")
        percentile: float = spec(99.99, (lambda v: 50 < v <= 100, "a number in (50, 100]"),
                                 doc="percentile calibration: clip at the 100-p and p percentiles")
        calib_batches: int = spec(8, (lambda v: v >= 1, "an integer >= 1"),
                                  doc="training batches (train.batch_size each) used for calibration")
        retry: bool = spec(False, doc="try the calibration methods in order until the val accuracy drop "
                                       "is within tolerance; record the one chosen")
        tolerance: float = spec(0.005, (lambda v: v >= 0, "a number >= 0"),
                                doc="allowed val accuracy drop for retry (0.01 = 1 point)")
        bias_correction: bool = spec(False, doc="empirical bias correction (Nagel et al. 2019)")
        cle: bool = spec(False, doc="cross-layer equalization before quantizing (Nagel et al. 2019)")
        learned_scale: bool = spec(False, doc="QAT learns the scales (LSQ) instead of recomputing ranges")
        qat_steps: int | None = spec(None, (lambda v: v >= 1, "an integer >= 1"),
                                     doc="QAT fine-tuning steps; default one epoch (full training "
                                         "from the rewind point)")
        qat_lr: float | None = spec(None, (lambda v: v > 0, "a number > 0"),
                                    doc="QAT learning rate (constant); default train.lr / 10")
        qat_start: str = spec("trained", (lambda v: v in ("trained", "rewind"), "trained or rewind"),
                              doc="QAT starts from the trained ticket or from the rewind point")

        @classmethod
        def from_dict(cls, d: dict, where: str = "quant") -> "QuantConfig":
            from .config import _build

            return _build(cls, d, "quant.", where)

        def to_dict(self) -> dict:
            return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    return QuantConfig


QuantConfig = _quant_config_class()


def load_quant_config(path: str | Path) -> "QuantConfig":
    """The ``[quant]`` table of a TOML file (an experiment file or a file of its own), validated."""
    from .config import ConfigError, load_raw

    raw = load_raw(path)
    table = raw.get("quant", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: quant must be a table, got {table!r}")
    return QuantConfig.from_dict(table, str(path))


# ============================================================================ runs in the store

# a row's setting: a rerun of the same setting replaces the row in quant.parquet
KEY_COLUMNS = ["level", "arm", "seed", "bits", "scheme", "granularity", "calibration_requested", "method",
               "act_bits", "act_scheme", "bias_correction", "cle", "retry", "learned_scale", "qat_start", "qat_steps",
               "qat_lr"]
COLUMNS = ["run_id", "level", "arm", "seed", "density", "bits", "scheme", "granularity", "calibration",
           "method", "accuracy", "float_accuracy", "size_bytes", "compression", "val_accuracy",
           "float_val_accuracy", "act_bits", "act_scheme", "bias_correction", "cle", "learned_scale", "qat_start",
           "qat_steps", "qat_lr", "retry", "calibration_requested", "calibration_tried", "fp32_dense_bytes",
           "fp16_dense_bytes", "int8_dense_bytes", "wall_s"]


@dataclass
class LoadedRun:
    """A stored IMP run: its config, data, model and (per level) ticket members."""

    path: Path
    cfg: Any
    data: Any
    model: Any
    hparams: dict

    @classmethod
    def open(cls, run_dir: str | Path) -> "LoadedRun":
        from .config import ExperimentConfig
        from .data import load_dataset
        from .models import build_model
        from .store import StoreError, read_json

        path = Path(run_dir)
        if not (path / "hparams.json").is_file():
            raise StoreError(f"{path} is not a run folder (no hparams.json); pass OUT/<run_id>")
        hparams = read_json(path / "hparams.json")
        raw = {k: v for k, v in hparams.items()
               if k not in ("run_id", "lth_version", "num_steps", "mask", "data_fingerprint")}
        cfg = ExperimentConfig.from_dict(raw, str(path / "hparams.json"))
        data = load_dataset(cfg.data)
        model = build_model(cfg.model, data.num_classes, data.input_shape)
        return cls(path, cfg, data, model, hparams)

    @property
    def run_id(self) -> str:
        return self.hparams.get("run_id", self.path.name)

    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level:03d}"

    def complete_levels(self) -> list[int]:
        from .store import RunStore

        store = RunStore(self.path.parent, self.path.name)
        return [int(d.name[6:]) for d in sorted(self.path.glob("level_[0-9][0-9][0-9]"))
                if store.is_complete(int(d.name[6:]))]

    def tickets(self, level: int) -> dict:
        """Ticket members of a level: ``{"members": [(arm, seed)], "index": [k], "params", "batch_stats",
        "masks"}`` (stacked ``[K, ...]`` numpy over the ticket members only)."""
        from .store import StoreError, load_tree, read_json

        from .store import RunStore

        d = self.level_dir(level)
        problem = RunStore(self.path.parent, self.path.name).level_problem(level)  # checksums verified
        if problem is not None:
            raise StoreError(f"{d} is not a complete level: {problem}")
        members = read_json(d / "members.json")
        idx = [k for k, m in enumerate(members) if m["arm"] == "ticket"]
        final = load_tree(d / "final.msgpack")
        masks = load_tree(d / "masks.msgpack")
        take = lambda t: jax.tree.map(lambda a: np.asarray(a)[np.asarray(idx)], t)  # noqa: E731
        return {"members": [(members[k]["arm"], int(members[k]["seed"])) for k in idx], "index": idx,
                "params": take(final["params"]), "batch_stats": take(final.get("batch_stats", {}) or {}),
                "masks": jax.tree.map(lambda a: a.astype(bool), take(masks))}

    def rewind_weights(self, seeds: Sequence[int]) -> dict:
        """Rewind-point ``{"params", "batch_stats"}`` stacked over ``seeds``."""
        from .store import RunStore

        name = "rewind.msgpack" if self.cfg.rewind.step > 0 else "init.msgpack"
        tree = RunStore(self.path.parent, self.path.name).read_tree(name)  # verified against MANIFEST.json
        idx = np.asarray([list(self.cfg.seeds).index(s) for s in seeds])
        return jax.tree.map(lambda a: np.asarray(a)[idx], {"params": tree["params"],
                                                           "batch_stats": tree.get("batch_stats", {}) or {}})

    def calib_x(self, batches: int) -> np.ndarray:
        """``batches`` training batches (a fixed random subset of the train split)."""
        n = min(len(self.data.x_train), batches * self.cfg.train.batch_size)
        idx = np.sort(np.random.default_rng(0).permutation(len(self.data.x_train))[:n])
        return np.asarray(self.data.x_train[idx])


def _density(mask: PyTree, params: PyTree) -> float:
    kept = total = 0
    for (path, m), p in zip(jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree.leaves(params)):
        if is_weight(path, p):
            kept += int(np.asarray(m).sum())
            total += int(np.asarray(m).size)
    return kept / total if total else 1.0


def _specs(qc, act: bool) -> list[QuantSpec]:
    out = []
    for bits in qc.bits:
        for scheme in qc.scheme:
            if bits == 1 and scheme != qc.scheme[0]:
                continue  # binary ignores the scheme
            for gran in qc.granularity:
                cals = qc.calibration[:1] if qc.retry else qc.calibration
                for cal in cals:
                    out.append(QuantSpec(bits, scheme, gran, cal, qc.act_bits if act else None, qc.act_scheme,
                                         None, qc.percentile))
    return out


def quantize_level(run: LoadedRun, level: int, qc, evaluator: Evaluator | None = None,
                   log: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Every setting of ``qc`` applied to the ticket members of one level; one row per member x setting."""
    from . import compress
    from .train import unstack

    ev = evaluator or Evaluator(run.data, run.cfg.train.eval_batch_size)
    t = run.tickets(level)
    K = len(t["members"])
    model = run.model
    calib = run.calib_x(qc.calib_batches)
    float_acc = ev.accuracy(model, t["params"], t["batch_stats"])
    float_val = float_acc.get("val", float_acc["test"])
    densities = [_density(unstack(t["masks"], k), unstack(t["params"], k)) for k in range(K)]
    rows = []
    for spec in _specs(qc, qc.activations):
        for method in qc.method:
            t0 = time.time()
            tried, steps, lr_used = [spec.calibration], 0, 0.0
            if method == "ptq" and qc.retry:
                qts, acc, tried = _retry(model, t, spec, calib, qc, ev, float_val)
            elif method == "ptq":
                qts, acc = _ptq_population(model, t, spec, calib, qc, ev)
            else:
                qts, steps, lr_used = _run_qat(run, t, spec, calib, qc)
                acc = ev.quantized(model, qts)
            wall = time.time() - t0
            for k, (arm, seed) in enumerate(t["members"]):
                sizes = compress.size_report(qts[k])
                rows.append({
                    "run_id": run.run_id, "level": level, "arm": arm, "seed": seed, "density": densities[k],
                    "bits": spec.bits, "scheme": spec.scheme_name, "granularity": spec.granularity,
                    "calibration": qts[k].calibration, "method": method,
                    "accuracy": float(acc["test"][k]), "float_accuracy": float(float_acc["test"][k]),
                    "size_bytes": int(sizes["size_bytes"]), "compression": float(sizes["compression"]),
                    "val_accuracy": float(acc.get("val", acc["test"])[k]), "float_val_accuracy": float(float_val[k]),
                    "act_bits": int(spec.act_bits or 0), "act_scheme": spec.act_scheme if spec.act_bits else "",
                    "bias_correction": bool(qc.bias_correction and method == "ptq"),
                    "cle": bool(qc.cle and method == "ptq"),
                    "learned_scale": bool(qc.learned_scale and method == "qat"),
                    "qat_start": qc.qat_start if method == "qat" else "",
                    "qat_steps": int(steps) if method == "qat" else 0,
                    "qat_lr": float(lr_used) if method == "qat" else 0.0, "retry": bool(qc.retry and method == "ptq"),
                    "calibration_requested": (",".join(qc.calibration) if method == "ptq" and qc.retry
                                              else spec.calibration),
                    "calibration_tried": ",".join(tried),
                    "fp32_dense_bytes": int(sizes["fp32_dense_bytes"]),
                    "fp16_dense_bytes": int(sizes["fp16_dense_bytes"]),
                    "int8_dense_bytes": int(sizes["int8_dense_bytes"]), "wall_s": wall,
                })
            if log is not None:
                a = np.mean(acc["test"])
                log(f"level {level} {method} {spec.bits}-bit {spec.scheme_name}/{spec.granularity}/"
                    f"{qts[0].calibration}: test acc {a:.4f} (float {np.mean(float_acc['test']):.4f}) "
                    f"{wall:.1f} s")
    return pd.DataFrame.from_records(rows, columns=COLUMNS)


def _run_qat(run: LoadedRun, t: dict, spec: QuantSpec, calib: np.ndarray, qc) -> tuple[list, int, float]:
    """QAT of the ticket members ``t`` as ``qc`` says: (quantized members, steps, lr).

    From the trained ticket (default): ``qat_steps`` (default one epoch) at the constant
    ``qat_lr`` (default train.lr / 10). From the rewind point: the run's full training length and
    schedule, unless ``qat_steps`` / ``qat_lr`` are set.
    """
    from .train import make_schedule, steps_per_epoch, total_steps

    seeds = [s for _, s in t["members"]]
    n_train = len(run.data.x_train)
    if qc.qat_start == "rewind":
        start = run.rewind_weights(seeds)
        steps = qc.qat_steps or run.hparams.get("num_steps") or total_steps(run.cfg.train, n_train)
        lr_kw = {"lr": qc.qat_lr} if qc.qat_lr else {"lr_fn": make_schedule(run.cfg.train, steps)}
        lr = qc.qat_lr or run.cfg.train.lr  # (the schedule's peak)
    else:
        start = {"params": t["params"], "batch_stats": t["batch_stats"]}
        steps = qc.qat_steps or steps_per_epoch(run.cfg.train, n_train)
        lr = qc.qat_lr or run.cfg.train.lr / 10
        lr_kw = {"lr": lr}
    qts, _ = qat(run.model, run.data, run.cfg.train, start["params"], start["batch_stats"], t["masks"], spec, calib,
                 seeds=seeds, steps=int(steps), learned_scale=qc.learned_scale, **lr_kw)
    return qts, int(steps), float(lr)


def _ptq_population(model, t, spec, calib, qc, ev):
    from .train import unstack

    qts = [ptq(model, unstack(t["params"], k), unstack(t["batch_stats"], k), spec, calib,
               bias_correction=qc.bias_correction, cle=qc.cle) for k in range(len(t["members"]))]
    return qts, ev.quantized(model, qts)


def _retry(model, t, spec, calib, qc, ev, float_val):
    """Step 5 of the algorithm: recompute S and Z another way until the val drop is within tolerance.

    Tries ``qc.calibration`` in order (per member); keeps the first within ``qc.tolerance`` of the
    float val accuracy, else the best val accuracy seen.
    """

    K = len(t["members"])
    best: list = [None] * K
    done = [False] * K
    tried: list[str] = []
    for cal in qc.calibration:
        if all(done):
            break
        tried.append(cal)
        qts, acc = _ptq_population(model, t, spec.replace(calibration=cal), calib, qc, ev)
        val = acc.get("val", acc["test"])
        for k in range(K):
            if done[k]:
                continue
            if best[k] is None or val[k] > best[k][1]:
                best[k] = (dataclasses.replace(qts[k], calibration=cal), val[k])
            if float_val[k] - val[k] <= qc.tolerance:
                best[k] = (dataclasses.replace(qts[k], calibration=cal), val[k])
                done[k] = True
    qts = [b[0] for b in best]
    return qts, ev.quantized(model, qts), tried


def quantize_run(run_dir: str | Path, levels: Iterable[int] | None = None, bits_list: Sequence[int] | None = None,
                 methods: Sequence[str] | None = None, *, config=None, write: bool = True,
                 log: Callable[[str], None] | None = None, **settings) -> pd.DataFrame:
    """Quantize the ticket members of ``levels`` (default: every complete level) of a stored run.

    ``bits_list``, ``methods`` and ``settings`` (any :class:`QuantConfig` field, e.g.
    ``scheme=("sym", "asym")``, ``calibration=("minmax", "mse")``, ``retry=True``) override
    ``config``. Each level's rows are merged into ``level_NNN/quant.parquet`` (written atomically;
    rows of the same setting are replaced). Returns the new rows; columns :data:`COLUMNS`.
    """
    from .config import ConfigError

    base = (config or QuantConfig()).to_dict()
    if bits_list is not None:
        base["bits"] = list(bits_list)
    if methods is not None:
        base["method"] = list(methods)
    for k, v in settings.items():
        base[k] = list(v) if isinstance(v, (tuple, list)) else v
    qc = QuantConfig.from_dict(base)
    run = LoadedRun.open(run_dir)
    complete = run.complete_levels()
    levels = complete if levels is None else [int(x) for x in levels]
    missing = [x for x in levels if x not in complete]
    if missing:
        raise ConfigError(f"{run.path}: level(s) {', '.join(map(str, missing))} are not complete; complete "
                          f"levels: {', '.join(map(str, complete)) or 'none'}")
    ev = Evaluator(run.data, run.cfg.train.eval_batch_size)
    frames = []
    for level in levels:
        df = quantize_level(run, level, qc, ev, log)
        if write:
            write_quant_table(run.level_dir(level), df)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def write_quant_table(level_dir: Path, df: pd.DataFrame) -> pd.DataFrame:
    """Merge ``df`` into ``level_dir/quant.parquet`` (same setting replaced), atomically."""
    from .store import atomic_write_bytes, parquet_bytes, read_parquet

    path = Path(level_dir) / "quant.parquet"
    if path.is_file():
        old = read_parquet(path)
        keys = set(map(tuple, df[KEY_COLUMNS].astype(str).values.tolist()))
        keep = [tuple(r) not in keys for r in old[KEY_COLUMNS].astype(str).values.tolist()] if len(old) else []
        df = pd.concat([old[keep], df], ignore_index=True) if len(old) else df
    atomic_write_bytes(path, parquet_bytes(df))
    return df


def quantize_member(run: LoadedRun, level: int, spec: QuantSpec, *, member: int = 0, method: str = "ptq",
                    qc=None) -> tuple[QuantizedTicket, dict]:
    """One ticket member of a level quantized (PTQ or QAT); also returns ``{"arm", "seed"}``."""
    from .train import unstack

    qc = qc or QuantConfig()
    t = run.tickets(level)
    if not 0 <= member < len(t["members"]):
        raise ValueError(f"member {member} does not exist; level {level} has {len(t['members'])} ticket members")
    one = {k: jax.tree.map(lambda a: a[member:member + 1], t[k]) for k in ("params", "batch_stats", "masks")}
    one["members"] = t["members"][member:member + 1]
    calib = run.calib_x(qc.calib_batches)
    arm, seed = t["members"][member]
    if method == "ptq":
        qt = ptq(run.model, unstack(one["params"], 0), unstack(one["batch_stats"], 0), spec, calib,
                 bias_correction=qc.bias_correction, cle=qc.cle)
    elif method == "qat":
        qt = _run_qat(run, one, spec, calib, qc)[0][0]
    else:
        raise ValueError(f"method = {method!r}; allowed: {', '.join(METHODS)}")
    return qt, {"arm": arm, "seed": seed}


def describe_quant_fields() -> str:
    """Every ``[quant]`` setting with its default and meaning (as ``lth settings`` lists the others)."""
    def default(f):
        return json.dumps(list(f.default) if isinstance(f.default, tuple) else f.default)

    return "\n".join(f"  quant.{f.name} = {default(f)}  {f.metadata.get('doc', '')}"
                     for f in dataclasses.fields(QuantConfig))

"""Post-training quantization: PTQ of one network, bias rounding, empirical bias correction and
cross-layer equalization (Nagel et al. 2019)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
QParams = dict  # {"scale": array, "zero_point": array}

from ..models import structure_of
from ..train import population_program, stack, unstack
from .numerics import QuantSpec, scale_zero_point
from .wiring import (act_qparams, base_variables, call_order, collect_inputs, cached, fake_quant_model, get_layer,
                     input_ranges,
                     layer_outputs, quantize_weights, set_leaf, traced_bits, weight_codes, weight_qparams)

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


def ptq_population(model, params: PyTree, batch_stats: PyTree, spec: QuantSpec, calib_x: np.ndarray | None = None,
                   *, bias_correction: bool = False, cle: bool = False,
                   member_batch: int | None = None) -> list[QuantizedTicket]:
    """:func:`ptq` of every member of a population ``[K, ...]`` with one compiled program per step.

    Weight calibration and quantization, and (minmax) activation ranges run over the stacked
    members (:func:`lth.train.population_program`: ``member_batch`` at a time, vmapped; on CPU
    one after another in the same program, so a member's numbers do not depend on K). CLE,
    percentile/MSE activation ranges and bias correction run member by member. Returns one
    :class:`QuantizedTicket` per member, equal to :func:`ptq` of that member alone.
    """
    K = jax.tree.leaves(params)[0].shape[0]
    if cle:
        params = stack([jax.device_get(equalize(model, unstack(params, k)))
                        for k in range(K)])
    wq, qparams = weights_program(spec, member_batch)(params)
    qts = quantized_population(model, qparams, batch_stats, wq, spec, calib_x, member_batch=member_batch)
    if bias_correction:
        if calib_x is None:
            raise ValueError("bias correction needs calibration data (calib_x)")
        qts = [bias_correct(model, jax.tree.map(jnp.asarray, unstack(params, k)),
                            jax.tree.map(jnp.asarray, unstack(batch_stats, k)), qt, calib_x)
               for k, qt in enumerate(qts)]
    return [round_biases(qt) for qt in qts]


def quantized_population(model, qparams: PyTree, batch_stats: PyTree, wq: dict, spec: QuantSpec,
                         calib_x: np.ndarray | None, *, member_batch: int | None = None) -> list[QuantizedTicket]:
    """One :class:`QuantizedTicket` per member of a population whose kernels are already on their grid
    (``qparams [K, ...]``, their quantizers ``wq [K, ...]``), with the activation quantizers of
    ``spec`` calibrated on ``calib_x`` run through the weight-quantized members (biases not rounded
    yet: :func:`round_biases`). Shared by PTQ and GPTQ, so both quantize activations alike."""
    K = jax.tree.leaves(qparams)[0].shape[0]
    wq, qparams = jax.device_get((wq, qparams))
    acts: list[dict] = [{} for _ in range(K)]
    if spec.act_bits is not None:
        if calib_x is None:
            raise ValueError("activation quantization needs calibration data (calib_x)")
        if (spec.act_calibration or spec.calibration) == "minmax":
            lo, hi = input_ranges(model, qparams, batch_stats, calib_x, member_batch=member_batch)
            for k in range(K):
                for key in lo:
                    s, z = scale_zero_point(lo[key][k], hi[key][k], spec.act_bits, spec.act_scheme)
                    acts[k][key] = {"scale": s.reshape(()), "zero_point": z.reshape(())}
        else:
            acts = [act_qparams(collect_inputs(model, unstack(qparams, k), unstack(batch_stats, k), calib_x), spec)
                    for k in range(K)]
    return [QuantizedTicket(spec, jax.tree.map(jnp.asarray, unstack(qparams, k)),
                            jax.tree.map(jnp.asarray, unstack(batch_stats, k)), unstack(wq, k), acts[k],
                            spec.calibration) for k in range(K)]


def weights_program(spec: QuantSpec, member_batch: int | None):
    """Compiled ``params [K] -> (weight qparams [K], fake-quantized params [K])``: one program for every
    multi-bit width (the bit width passed as data, :func:`lth.quant.wiring.traced_bits`)."""
    pspec, grid = traced_bits(spec)

    def member(p, g):
        wq = weight_qparams(p, pspec, g)
        return wq, quantize_weights(p, wq, pspec, g)

    run = cached(("weights", pspec, member_batch), None,
                 lambda: jax.jit(population_program(member, (0, None), member_batch)))
    return lambda params: run(params, grid)


def round_biases(qt: QuantizedTicket) -> QuantizedTicket:
    """Biases rounded to the int32 grid of their accumulator, ``S_x S_w`` (Jacob et al. 2018, Sec. 2.4).

    Integer inference adds the bias as ``round(b / (S_x S_w))`` to the int32 accumulator; rounding
    it here too makes the fake-quant model compute exactly what the integer model does (at 2 bits
    ``S_w`` is large and the difference would flip requantization roundings).
    """
    params = qt.params
    for key, aq in qt.act_qparams.items():
        try:
            bias = get_layer(params, key)["bias"]
        except KeyError:
            continue
        if "group_index" in qt.weight_qparams[key]:
            continue  # per-group scales (GPTQ): no single accumulator grid; the bias stays float32
        # on the host: a handful of tiny arrays, not worth a compiled program per shape
        bias = np.asarray(bias, np.float32)
        step = np.asarray(aq["scale"], np.float32) * np.broadcast_to(
            np.asarray(qt.weight_qparams[key]["scale"], np.float32), bias.shape)
        params = set_leaf(params, key, "bias", jnp.asarray(np.round(bias / step) * step))
    return dataclasses.replace(qt, params=params)



def bias_correct(model, float_params: PyTree, batch_stats: PyTree, qt: QuantizedTicket,
                 calib_x: np.ndarray) -> QuantizedTicket:
    """Empirical bias correction (Nagel et al. 2019, Sec. 4.2): remove the expected output shift.

    Layer by layer in call order, ``b <- b - (E[y_quant] - E[y_float])`` with the means taken over
    ``calib_x`` and all but the channel axis; each layer sees the already-corrected earlier layers,
    so the shift caused by every earlier quantization error is corrected too. Layers without bias
    are skipped.
    """
    fq = fake_quant_model(model, qt.spec, "static")
    float_vars = base_variables(float_params, batch_stats)
    ref = layer_outputs(model, float_vars, calib_x)
    params = qt.params
    for key in call_order(model, float_vars, calib_x[:1]):
        try:
            bias = get_layer(params, key)["bias"]
        except KeyError:
            continue
        out = layer_outputs(fq, dataclasses.replace(qt, params=params).variables(), calib_x)
        params = set_leaf(params, key, "bias", bias - jnp.asarray(out[key] - ref[key]))
    return dataclasses.replace(qt, params=params)


# ============================================================================ the layer program

def layer_program(model) -> list[dict]:
    """The forward pass of a model's declared layer chain (:class:`lth.models.Structure`) as a list of
    ops (for CLE and integer inference).

    Ops: ``{"op": "dense" | "conv", "layer": name, "relu": bool}``, ``{"op": "pool"}`` (2x2 max,
    stride 2), ``{"op": "flatten"}``. ValueError naming the model when it declares no chain (residuals),
    or naming the layer or op the integer program does not have (batch norm, average pooling, strides).
    """
    st = structure_of(model)
    if st.chain is None and (st.heads or st.mlps):  # a transformer
        raise ValueError(f"not supported for model {type(model).__name__}: integer inference (lth export, "
                         "eval-export) and cross-layer equalization run chains of dense/conv layers with ReLU, and a "
                         "transformer block also needs softmax attention, layer norms and GELU; use `lth quantize` "
                         "(fake-quantized PTQ/QAT accuracy and compressed bytes) instead")
    if st.chain is None:
        raise ValueError(f"{type(model).__name__} declares no plain chain of layers (lth.models.Structure.chain): "
                         "cross-layer equalization and integer inference need one (mlp, lenet_300_100, conv2/4/6 "
                         "have one; residual networks do not)")
    ops: list[dict] = []
    for op in st.chain:
        if op.get("norm"):
            raise ValueError(f"{type(model).__name__}: layer {op['layer']!r} is followed by batch norm "
                             f"{op['norm']!r}; cross-layer equalization and integer inference need layers "
                             "without batch norm")
        if op["op"] not in ("dense", "conv", "pool", "flatten"):
            raise ValueError(f"{type(model).__name__}: chain op {op['op']!r} is not in the integer program "
                             "(dense, conv, pool, flatten)")
        if op["op"] == "conv" and op.get("strides", 1) != 1:
            raise ValueError(f"{type(model).__name__}: conv layer {op['layer']!r} has strides "
                             f"{op['strides']}; the integer program runs stride-1 convolutions")
        ops.append({k: op[k] for k in ("op", "layer", "relu") if k in op})
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


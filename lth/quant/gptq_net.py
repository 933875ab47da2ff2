"""GPTQ of whole networks (Frantar et al. 2023), a population at a time: the quant method ``gptq``.

Layer after layer in forward (call) order, every member's Dense kernel is quantized by
:func:`lth.quant.gptq.gptq` (``w = kernel.T [out, in]``) from its calibration inputs ``[N, in]``
(a 2-D conv kernel ``[kh, kw, cin, out]`` as ``[out, kh*kw*cin]`` with its im2col inputs, kept as
``R [in, in]`` with ``R^T R = X^T X``: the one-shot arms' :func:`lth.prune.oneshot_net.conv_patches`
and :func:`~lth.prune.oneshot_net.gram_root`; GPTQ needs only ``X^T X``),
recorded with the layers before it *already GPTQ-quantized* (the paper's sequential setting), with
the member's mask fixed: pruned weights stay exactly 0 and only kept weights absorb rounding
errors. The grid is lth's min-max grid (:mod:`lth.quant.numerics`) per output channel, or per group
of ``group_size`` inputs of a channel. Activations are then quantized exactly as PTQ does
(:func:`lth.quant.ptq.quantized_population`).

Weight quantizers are stored as PTQ's per-channel ``{"scale" [C], "zero_point" [C]}``; grouped ones
as ``{"scale" [groups, C], "zero_point" [groups, C], "group_index" [fan_in]}`` (the group of each
input, ``fan_in = kh*kw*cin`` for a conv in the kernel's row-major order;
:func:`lth.quant.wiring.expand_groups`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..prune.oneshot_net import conv_patches, gram_root
from ..train import population_program
from .gptq import gptq
from .numerics import QuantSpec
from .ptq import QuantizedTicket, quantized_population, round_biases
from .wiring import QUANT_LAYERS, base_variables, cached, call_order, get_layer, set_leaf

PyTree = Any


def conv_layers(params: PyTree) -> list[str]:
    """Layer keys whose kernel is a conv kernel (rank > 2), in a single member's params."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if path[-1].key == "kernel" and np.ndim(leaf) > 2:
            out.append("/".join(p.key for p in path[:-1]))
    return out


def check_gptq_model(params: PyTree, where: str = "quant.method") -> None:
    """ValueError (one line) when the model has kernels of rank > 4 (3-D convs), which GPTQ does not
    unfold; Dense and 2-D conv kernels are handled."""
    other = [k for k in conv_layers(params) if np.ndim(get_layer(params, k)["kernel"]) != 4]
    if other:
        raise ValueError(f"{where} = gptq: only Dense and 2-D conv layers are supported (this model has "
                         f"{', '.join(other)}); use ptq or qat for it")


def layer_inputs_program(model, key: str, member_batch: int | None):
    """Compiled ``(params [K], batch_stats [K], x [N, ...]) -> inputs of layer key [K, N', in]``: a Dense
    layer's input rows; a 2-D conv's im2col rows as their Gram root ``[K, in, in]``
    (:func:`lth.prune.oneshot_net.gram_root`: the same ``X^T X``, ``in = kh*kw*cin``)."""
    def build():
        def member(p, b, x):
            store: dict = {}

            def record(next_fun, args, kwargs, context):
                if (context.method_name == "__call__" and isinstance(context.module, QUANT_LAYERS) and args
                        and "/".join(context.module.path) == key):
                    a = args[0]
                    if isinstance(context.module, nn.Conv):
                        rows = conv_patches(context.module, a)
                        if rows is None:
                            raise ValueError(f"quant.method = gptq: conv layer {key} cannot be unfolded (grouped, "
                                             "circular padding or not 2-D); use ptq or qat for this model")
                        store["x"] = gram_root(rows.astype(jnp.float32))
                    else:
                        store["x"] = a.reshape(-1, a.shape[-1])
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(record):
                model.apply(base_variables(p, b), x, train=False)
            return store["x"]

        return jax.jit(population_program(member, (0, 0, None), member_batch))

    return cached(("gptq_inputs", key, member_batch), model, build)


def _gptq_program(spec: QuantSpec, group_size: int | None, act_order: bool, damp: float, density: float | None,
                  member_batch: int | None):
    """Compiled ``(w [K, out, in], x [K, N, in], mask [K, out, in]) -> (w_q, params, mask)`` of a population."""
    def member(w, x, m):
        wq, mask, params = gptq(w, x, bits=spec.bits, scheme=spec.scheme, group_size=group_size,
                                act_order=act_order, damp=damp, mask=m, density=density)
        return wq, params, mask

    return cached(("gptq", spec.bits, spec.scheme, group_size, act_order, damp, density, member_batch), None,
                  lambda: jax.jit(population_program(member, (0, 0, 0), member_batch)))


def gptq_population(model, params: PyTree, batch_stats: PyTree, masks: PyTree, spec: QuantSpec,
                    calib_x: np.ndarray, *, group_size: int | None = None, act_order: bool = False,
                    damp: float = 0.01, density: float | None = None, member_batch: int | None = None,
                    return_masks: bool = False):
    """GPTQ of every member of a population ``[K, ...]`` (one compiled program per layer shape).

    Args:
      params, batch_stats, masks: stacked ``[K, ...]`` (masks: 1/True keeps a weight).
      spec: bits and scheme of the weight grid, activation quantization (``act_bits``, PTQ's).
      calib_x: calibration inputs ``[N, ...]`` (the same as PTQ's).

      density: the joint SparseGPT + GPTQ pass: each layer pruned further to this fraction of its weights
        among the member's survivors (:func:`lth.quant.gptq.survivor_chooser`); None: the mask as it is.

    Returns:
      One :class:`QuantizedTicket` per member (kernels dequantized on their grid, pruned weights 0);
      with ``return_masks`` also the masks ``[K, ...]`` the kernels have (bool; new ones with ``density``).
    """
    if spec.bits < 2:
        raise ValueError(f"gptq needs bits >= 2, got {spec.bits}")
    one = jax.tree.map(lambda a: np.asarray(a)[0], params)
    check_gptq_model(one)
    order = call_order(model, base_variables(one, jax.tree.map(lambda a: np.asarray(a)[0], batch_stats)),
                       np.asarray(calib_x[:1]))
    params = jax.tree.map(jnp.asarray, params)
    batch_stats = jax.tree.map(jnp.asarray, batch_stats)
    run = _gptq_program(spec, group_size, act_order, damp, density, member_batch)
    masks_out = jax.tree.map(lambda a: np.asarray(a, bool), masks)
    x_cal = jnp.asarray(calib_x)
    wq: dict[str, dict] = {}
    for key in order:
        kernel = get_layer(params, key)["kernel"]  # [K, in, out] or a conv's [K, kh, kw, cin, out]
        shape = kernel.shape
        as_w = lambda a: jnp.swapaxes(a.reshape(shape[0], -1, shape[-1]), 1, 2)  # noqa: E731  [K, out, in]
        x = layer_inputs_program(model, key, member_batch)(params, batch_stats, x_cal)  # [K, N, in]
        m = jnp.asarray(get_layer(masks, key)["kernel"], jnp.float32)
        w_new, qp, m_new = run(as_w(kernel), x, as_w(m))
        w_new = jnp.where(m_new > 0, w_new, 0.0)  # +0.0 where pruned (the sweep's products can leave -0.0)
        masks_out = set_leaf(masks_out, key, "kernel", np.swapaxes(np.asarray(m_new), 1, 2).reshape(shape) > 0)
        params = set_leaf(params, key, "kernel", jnp.swapaxes(w_new, 1, 2).reshape(shape))
        if group_size is None:  # PTQ's per-channel layout
            wq[key] = {"scale": qp["scale"][:, 0], "zero_point": qp["zero_point"][:, 0]}
        else:
            wq[key] = {"scale": qp["scale"], "zero_point": qp["zero_point"], "group_index": qp["group_index"]}
    qts = quantized_population(model, params, batch_stats, wq, spec, calib_x, member_batch=member_batch)
    qts = [round_biases(qt) for qt in qts]
    return (qts, masks_out) if return_masks else qts

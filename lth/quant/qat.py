"""Quantization-aware training of a masked population on the training engine."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
QParams = dict  # {"scale": array, "zero_point": array}

from ..train import Engine, member_batch_size, stack, unstack
from .numerics import QuantSpec
from .ptq import QuantizedTicket, ptq_population, round_biases, weights_program
from .wiring import fake_quant_model, get_layer, lsq_grad_scale, quantize_weights, traced_bits, weight_qparams

# ============================================================================ QAT

# Compiled QAT engines, most recent last, keyed by what they compute: (base model, quant spec, weights
# mode, data fingerprint and augmentation, train config, lr). Each holds the train split on the device, so the cache
# keeps engines while their train splits total at most ENGINE_BYTES (at least the newest one).
_ENGINES: "collections.OrderedDict" = collections.OrderedDict()
ENGINE_BYTES = 1 << 30


def qat_variables(qt: QuantizedTicket, float_params: PyTree, learned_scale: bool) -> tuple[dict, dict]:
    """(params, batch_stats) of a QAT :class:`FakeQuantModel` started from float weights.

    ``qt`` (the PTQ of the same weights) gives the activation ranges, the weight zero points and,
    with ``learned_scale``, the initial scales (log domain). A multi-bit ``qt.spec`` also puts its
    weight bit width in as data (``w_grid``, :func:`lth.quant.wiring.traced_bits`, and with
    ``learned_scale`` LSQ's gradient scales ``w_grad_scale``, float32 computed on the host as the
    constant path rounds them), for :func:`lth.quant.wiring.fake_quant_model`'s shared program.
    """
    params = {"net": float_params}
    consts = {"acts": qt.act_qparams, "on": jnp.float32(1.0),
              "w_zero_point": {k: v["zero_point"] for k, v in qt.weight_qparams.items()}}
    grid = traced_bits(qt.spec)[1]
    if grid is not None:
        consts["w_grid"] = grid
        if learned_scale:
            consts["w_grad_scale"] = {k: np.float32(lsq_grad_scale(np.shape(get_layer(float_params, k)["kernel"]),
                                                                   qt.spec)) for k in qt.weight_qparams}
    if learned_scale:
        params["lsq"] = {"w": {k: jnp.log(v["scale"]) for k, v in qt.weight_qparams.items()},
                         "a": {k: jnp.log(v["scale"]) for k, v in qt.act_qparams.items()}}
    return params, {"net": qt.batch_stats, "quant": consts}


def freeze_qat(model_params: dict, batch_stats: dict, spec: QuantSpec, learned_scale: bool) -> QuantizedTicket:
    """The :class:`QuantizedTicket` a QAT model computes (one member's final variables)."""
    consts = batch_stats["quant"]
    net = model_params["net"]
    pspec, grid = traced_bits(spec)  # the programs every multi-bit width shares
    if learned_scale:
        wq = {k: {"scale": jnp.exp(model_params["lsq"]["w"][k]), "zero_point": consts["w_zero_point"][k]}
              for k in consts["w_zero_point"]}
        acts = {k: {"scale": jnp.exp(model_params["lsq"]["a"][k]), "zero_point": v["zero_point"]}
                for k, v in consts["acts"].items()}
    else:
        wq = weight_qparams(net, pspec, grid)
        acts = consts["acts"]
    qparams = quantize_weights(net, wq, pspec, grid)
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
    return _fine_tune(model, data, train_cfg, params, batch_stats, masks, spec, calib_x, seeds=seeds, steps=steps,
                      lr=lr, learned_scale=learned_scale, lr_fn=lr_fn, quantize=True)


def float_ft(model, data, train_cfg, params: PyTree, batch_stats: PyTree, masks: PyTree, spec: QuantSpec,
             calib_x: np.ndarray, *, seeds: Sequence[int], steps: int, lr: float | None = None,
             learned_scale: bool = False, lr_fn=None) -> tuple[dict, list[dict]]:
    """QAT's float control: the population fine-tuned in float with exactly :func:`qat`'s schedule.

    The same arguments give the same compiled program (the same engine, when ``lr`` is constant),
    the same start weights and masks, batch order (``seeds``), dropout keys, steps and learning
    rate as ``qat``; only each member's quantization switch is off (:func:`lth.quant.wiring.quant_gate`),
    so a quantized model is compared with a float network trained exactly as much (Fair comparison,
    rule 1). ``spec`` only picks the program. Returns ``{"params", "batch_stats"}`` of the fine-tuned
    float members (stacked ``[K, ...]``, pruned weights exactly 0) and the engine's metric records.
    """
    return _fine_tune(model, data, train_cfg, params, batch_stats, masks, spec, calib_x, seeds=seeds, steps=steps,
                      lr=lr, learned_scale=learned_scale, lr_fn=lr_fn, quantize=False)


def _fine_tune(model, data, train_cfg, params, batch_stats, masks, spec: QuantSpec, calib_x, *, seeds, steps, lr,
               learned_scale, lr_fn, quantize: bool):
    """QAT (``quantize``) or its float control: one code path, one program, one schedule."""
    K = len(seeds)
    member_batch = member_batch_size(train_cfg)
    members_p, members_b = [], []
    for k, qt in enumerate(ptq_population(model, params, batch_stats, spec, calib_x, member_batch=member_batch)):
        qp, qb = qat_variables(qt, jax.tree.map(jnp.asarray, unstack(params, k)), learned_scale)
        if not quantize:
            qb["quant"]["on"] = jnp.float32(0.0)
        members_p.append(qp)
        members_b.append(qb)
    fq = fake_quant_model(model, spec, "lsq" if learned_scale else "fixed")
    cfg = dataclasses.replace(train_cfg, steps=int(steps), epochs=None, eval_every=int(steps))
    if lr_fn is None:
        # one engine (compiled programs) per (model, setting, data and its augmentation, steps, lr): levels of a sweep share it
        lr = float(lr if lr is not None else train_cfg.lr)
        key = (fq.base, fq.spec, fq.weights, data.fingerprint["sha256"], getattr(data, "augment", "none"), cfg, lr)
        if key not in _ENGINES:
            _ENGINES[key] = Engine(fq, data, cfg, lr_fn=optax.constant_schedule(lr), lr_key=("constant", lr))
            while len(_ENGINES) > 1 and sum(e.x_train.nbytes for e in _ENGINES.values()) > ENGINE_BYTES:
                _ENGINES.popitem(last=False)
        _ENGINES.move_to_end(key)
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
    result = engine.run(state, list(seeds), evaluate=False)  # the frozen networks are evaluated by the caller
    final_p = jax.device_get(result.state.params)
    final_b = jax.device_get(result.state.batch_stats)
    if not quantize:
        return {"params": final_p["net"], "batch_stats": final_b["net"]}, result.records
    if learned_scale:
        frozen = [freeze_qat(jax.tree.map(jnp.asarray, unstack(final_p, k)),
                             jax.tree.map(jnp.asarray, unstack(final_b, k)), spec, learned_scale) for k in range(K)]
        return frozen, result.records
    # fixed ranges: the ranges of the final weights, for the whole population with PTQ's compiled program
    wq, qparams = jax.device_get(weights_program(spec, member_batch)(final_p["net"]))
    frozen = [round_biases(QuantizedTicket(spec, jax.tree.map(jnp.asarray, unstack(qparams, k)),
                                           jax.tree.map(jnp.asarray, unstack(final_b["net"], k)), unstack(wq, k),
                                           unstack(final_b["quant"]["acts"], k), spec.calibration))
              for k in range(K)]
    return frozen, result.records


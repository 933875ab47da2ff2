"""The compiled, mask-aware population training engine.

One network's train step is a pure function ``(state, x, y) -> (state, metrics)``; a whole segment
between evaluations is one ``lax.scan`` over index batches with the data set resident on the device;
the segment runs over the population axis K (seeds and controls): vmapped, or on CPU member after
member inside the same program (``train.member_batch``, :func:`population_program`). K = 1 is the
same code. Where XLA runs a model's step far slower inside a loop (convolutions on CPU,
:func:`segment_strategy`), the same step is dispatched from the host one compiled step at a time
instead, with the same results to float rounding (XLA may fuse a step differently inside a loop).

With ``data.augment`` (:data:`lth.data.AUGMENTATIONS`) every step augments its gathered batch in the
same compiled program, keyed by ``fold_in(key(member's data seed), global step)`` (:func:`make_batch_fn`):
deterministic, the same in a population as alone, and the same after a resume.

Masks are pytrees of bools shaped like ``params``. A pruned weight starts at exactly +0.0 (the
state is built with the mask applied) and its gradient is zeroed before the optimizer, so its
momentum / Adam moments stay exactly zero and every update it receives is exactly zero (sgd,
momentum, nesterov, adam; the coupled weight decay adds ``wd * 0``): it is +0.0 after every step
without a second pass over the weights. Whenever the masks of a running state change
(:meth:`Engine.remask`, e.g. AGP), the newly pruned weights and their optimizer moments are zeroed.

This module knows no pruning: it trains whatever masks it is given.
"""

from __future__ import annotations

import collections
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from .config import MAX_STEPS, TrainConfig
from .data import AUGMENTATIONS, augment_key
from .models import cpu_conv_chunk_pixels

PyTree = Any
DEFAULT_EPOCHS = 10  # training length when neither train.epochs nor train.steps is set


@struct.dataclass
class TrainState:
    """State of one member (or, with a leading K axis on every leaf, of a population)."""

    step: jax.Array  # [] int32
    params: PyTree
    batch_stats: PyTree  # {} for models without batch norm
    opt_state: PyTree
    mask: PyTree  # bools, same tree as params
    rng: jax.Array
    # bools, same tree as params: the union of every mask this state has trained with (the start mask
    # OR-ed at each :func:`remask`), so moving masks (SET/RigL) report the weights ever active; carried in
    # the state, so a resumed segment continues it exactly
    ever: PyTree = None


# ---------------------------------------------------------------------------- schedule, optimizer

def steps_per_epoch(cfg: TrainConfig, n_train: int) -> int:
    if n_train < cfg.batch_size:
        raise ValueError(f"train.batch_size = {cfg.batch_size} is larger than the train split "
                         f"({n_train} examples)")
    return n_train // cfg.batch_size


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    """Training length in steps: ``train.steps`` if set, else ``epochs`` full passes (last partial batch dropped)."""
    if cfg.steps is not None:
        return cfg.steps
    steps = (cfg.epochs or DEFAULT_EPOCHS) * steps_per_epoch(cfg, n_train)
    if steps > MAX_STEPS:  # the state's step counter is int32
        raise ValueError(f"train.epochs = {cfg.epochs} is {steps} steps, more than a run may have ({MAX_STEPS}); "
                         "use fewer epochs")
    return steps


def make_schedule(cfg: TrainConfig, num_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step: constant, step (milestones x gamma) or cosine, after warmup."""
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "step":
        main = optax.piecewise_constant_schedule(cfg.lr, {int(m): cfg.gamma for m in cfg.milestones})
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(1, num_steps - cfg.warmup_steps))
    else:  # validated in config
        raise ValueError(cfg.schedule)
    if cfg.warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    if cfg.schedule == "step":  # milestones count from step 0, not from the end of warmup
        return lambda s: jnp.where(s < cfg.warmup_steps, warm(s), main(s))
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax update direction at unit learning rate; the step's lr multiplies it.

    The learning rate is applied in the train step as ``lr(state.step)`` so the schedule follows the
    global step: late rewinding resumes at step k, learning-rate rewinding replays it from k.
    """
    if cfg.optimizer == "sgd":
        opt = optax.sgd(1.0, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    elif cfg.optimizer == "adam":
        opt = optax.adam(1.0)
    elif cfg.optimizer == "adamw":
        # decoupled decay: the step's lr multiplies (adam direction + wd * param), as torch's AdamW;
        # a pruned weight is +0.0, so its decay term is 0 too
        opt = optax.adamw(1.0, weight_decay=cfg.weight_decay)
    else:  # validated in config
        raise ValueError(cfg.optimizer)
    if cfg.weight_decay and cfg.optimizer != "adamw":
        # Coupled L2 (as torch's weight_decay): added to the gradient before the optimizer.
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
    if cfg.clip_norm is not None:
        # first, as torch's clip_grad_norm_ before the step; masked gradients are zero, so the norm
        # is over the surviving weights' gradients only
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt


def final_lr(cfg: TrainConfig, num_steps: int) -> float:
    return float(make_schedule(cfg, num_steps)(num_steps))


# ---------------------------------------------------------------------------- model plumbing

def apply_mask(tree: PyTree, mask: PyTree) -> PyTree:
    """Zero every entry whose mask is False (exact +0.0, also for NaN or -0.0 entries)."""
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), tree, mask)


def init_variables(model, key: jax.Array, input_shape: Sequence[int]) -> tuple[PyTree, PyTree]:
    """(params, batch_stats) of one member; batch_stats is {} for models without batch norm."""
    variables = model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return variables["params"], variables.get("batch_stats", {})


def init_population(model, keys: jax.Array, input_shape: Sequence[int]) -> tuple[PyTree, PyTree]:
    """Stacked (params, batch_stats) ``[K, ...]`` for K init keys."""
    return _population_initializer(model, tuple(int(d) for d in input_shape))(keys)


@functools.lru_cache(maxsize=64)
def _population_initializer(model, input_shape: tuple[int, ...]) -> Callable:
    """One compiled initializer per (model, input shape): Flax modules compare by value, so every
    level and run of a model reuses it instead of tracing and compiling it again."""
    return jax.jit(jax.vmap(lambda k: init_variables(model, k, input_shape)))


def init_state(params: PyTree, batch_stats: PyTree, mask: PyTree, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
    """State of one member: masked params, fresh optimizer state at step 0."""
    params = apply_mask(params, mask)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), mask=mask, rng=rng,
                      ever=jax.tree.map(lambda m: jnp.asarray(m) != 0, mask))


def remask(state: TrainState, mask: PyTree, tx: optax.GradientTransformation) -> TrainState:
    """``state`` (one member) with new masks: newly pruned weights and their optimizer moments zeroed."""
    opt_state = optax.tree_map_params(tx, lambda v, m: jnp.where(m, v, jnp.zeros_like(v)), state.opt_state, mask)
    ever = None if state.ever is None else jax.tree.map(lambda e, m: e | (m != 0), state.ever, mask)
    return state.replace(params=apply_mask(state.params, mask), opt_state=opt_state, mask=mask, ever=ever)


def init_population_state(params, batch_stats, masks, tx, rngs, start: int = 0) -> TrainState:
    """Vmapped :func:`init_state` over a stacked population, at global step ``start``."""
    return _population_state_initializer(tx)(params, batch_stats, masks, rngs, jnp.int32(start))


@functools.lru_cache(maxsize=64)
def _population_state_initializer(tx: optax.GradientTransformation) -> Callable:
    def init(p, b, m, r, start):
        return init_state(p, b, m, tx, r).replace(step=start)

    return jax.jit(jax.vmap(init, in_axes=(0, 0, 0, 0, None)))


def _forward(model, params, batch_stats, x, train: bool):
    """Logits and the updated batch statistics (unchanged when the model has none or not training)."""
    if batch_stats:
        if train:
            logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            return logits, upd["batch_stats"]
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False), batch_stats
    return model.apply({"params": params}, x, train=train), batch_stats


MaskFn = Callable[..., tuple[PyTree, PyTree]]


def make_train_step(model, tx: optax.GradientTransformation, lr_fn: optax.Schedule,
                    mask_fn: MaskFn | None = None) -> Callable:
    """Pure masked step for one member: ``(state, x [B, ...], y [B], t, arg) -> (state, {loss, accuracy})``.

    ``tx`` gives the update direction at unit lr (:func:`make_optimizer`); ``lr_fn(step)`` scales it.
    ``mask_fn(t, params, mask, grads, rng, arg) -> (mask, info)``: a pure function that may change the
    mask at the step's start (sparse training with moving masks); ``t`` is the global step (the same
    scalar for every member, so a ``lax.cond`` on it stays a branch under ``vmap``), ``grads`` the dense
    gradient of this step's loss w.r.t. all weights (pruned ones included), ``arg`` the member's entry of
    ``Engine.run``'s ``member_args``; ``info`` (a pytree of arrays) is returned as the step's metric
    ``"mask"``. The new mask is applied as :func:`remask` does, then the step trains with it.
    """

    def step(state: TrainState, x, y, t=None, arg=None):
        rng, _ = jax.random.split(state.rng)

        def loss_fn(params):
            logits, bs = _forward(model, params, state.batch_stats, x, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (logits, bs)

        (loss, (logits, bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        extra = {}
        if mask_fn is not None:
            mask, extra["mask"] = mask_fn(t, state.params, state.mask, grads, state.rng, arg)
            state = remask(state, mask, tx)
        # pruned weights get no gradient, so no moments and an exactly zero update (module doc)
        grads = apply_mask(grads, state.mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = lr_fn(state.step)
        updates = jax.tree.map(lambda u: lr * u, updates)
        params = optax.apply_updates(state.params, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        new = state.replace(step=state.step + 1, params=params, batch_stats=bs, opt_state=opt_state, rng=rng)
        return new, {"loss": loss, "accuracy": acc, **extra}

    return step


def member_batch_size(cfg: TrainConfig) -> int | None:
    """Members vmapped together (``train.member_batch``); None = the whole population.

    Auto: 1 on CPU, where a vmapped population turns every matmul into a batched one of small
    matrices (slower per network than one plain matmul) and K members' weights and Adam moments no
    longer fit in cache; the whole population on accelerators, which need the batching to be busy.
    """
    if cfg.member_batch is not None:
        return cfg.member_batch
    return 1 if jax.default_backend() == "cpu" else None


def population_program(member: Callable, in_axes: tuple, member_batch: int | None,
                       unroll: bool = False) -> Callable:
    """Run ``member`` over a population: the leading axis of every argument whose ``in_axes`` is 0.

    ``member_batch`` members at a time are vmapped; the groups run one after another (``lax.map``)
    in the same program. None vmaps the whole population. ``unroll`` writes the groups out one after
    another instead of looping over them (no loop body: see :func:`segment_strategy`). With several
    local devices the population is split between them (``shard_map``; see
    :func:`population_sharding`) and each device runs its share this way, so no device waits for
    another's members.
    """
    def pop(*args):
        k = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes) if ax == 0)
        if k > 1 and (member_batch is None or member_batch >= k):
            return jax.vmap(member, in_axes=in_axes)(*args)
        # one member (plain, unbatched matmuls: a vmap of one is slower on CPU) or groups of members
        mapped = tuple(a for a, ax in zip(args, in_axes) if ax == 0)

        def one(xs):
            it = iter(xs)
            return member(*(next(it) if ax == 0 else a for a, ax in zip(args, in_axes)))

        batch = member_batch if member_batch is not None and 1 < member_batch < k else None
        if not unroll:
            return jax.lax.map(one, mapped, batch_size=batch)
        g = batch or 1
        groups = [jax.tree.map(lambda x: x[i:i + g], mapped) for i in range(0, k, g)]
        outs = [jax.vmap(one)(xs) if g > 1 else jax.tree.map(lambda y: y[None], one(jax.tree.map(lambda x: x[0], xs)))
                for xs in groups]
        return jax.tree.map(lambda *ys: jnp.concatenate(ys), *outs)

    def sharded(*args):
        k = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes) if ax == 0)
        mesh = population_sharding(k).mesh
        if mesh.size == 1:
            return pop(*args)
        P = jax.sharding.PartitionSpec
        specs = tuple(P("population") if ax == 0 else P() for ax in in_axes)
        return jax.shard_map(pop, mesh=mesh, in_specs=specs, out_specs=P("population"), check_vma=False)(*args)

    return sharded


SEGMENTS = ("scan", "step")
# The layout XLA's CPU backend runs convolutions in on its fast kernel, also inside a loop body
# (lhs, rhs, out specs of lax.ConvDimensionNumbers: NHWC, HWIO, NHWC).
_LOOP_FAST_CONV = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def segment_strategy(cfg: TrainConfig, model, input_shape: Sequence[int]) -> str:
    """How a segment runs (``train.segment``): "scan" or "step"; both run the same steps on the same
    batches and agree to float rounding: XLA may fuse a step inside a loop body differently than at the
    top level (an MLP differs in the last bits, ~1e-9; lth's conv layers give the same bits).

    "scan": the whole segment is one compiled ``lax.scan`` (:func:`make_segment_fn`), Python touches
    nothing between evaluations. "step": one compiled step per call, dispatched from the host
    (:func:`make_step_fn`). Auto: "step" on CPU for a model whose train step has a convolution that
    XLA's CPU backend runs far slower inside a loop body (any layout but NHWC x HWIO -> NHWC, or
    grouped: jax-ml/jax#12868; stock ``nn.Conv`` gradients), else "scan". lth's own conv layers
    write their gradients in that layout (:func:`lth.models.loop_friendly_conv`), so every built-in
    model scans: measured on 2 cores (benchmarks/throughput.py --conv-only), steps/s scan vs step:
    Conv-2 batch 60 8.6 vs 6.0, batch 128 2.5 vs 2.0, ResNet-20 batch 128 3.0 vs 2.6; with stock
    ``nn.Conv`` gradients a Conv-2 batch-60 step takes 12 s in a scan against 0.16 s at the top level.
    Accelerators scan (loops do not hide kernels there; unmeasured so far: benchmarks/gpu.sh).
    """
    if cfg.segment != "auto":
        return cfg.segment
    if jax.default_backend() != "cpu":
        return "scan"
    return "step" if has_loop_slow_conv(model, tuple(int(d) for d in input_shape)) else "scan"


@functools.lru_cache(maxsize=64)
def has_loop_slow_conv(model, input_shape: tuple[int, ...]) -> bool:
    """Whether the train step (forward and gradient) of ``model`` has a convolution that is not in
    the layout XLA's CPU backend runs fast inside a loop body. Traced abstractly, nothing runs.
    A model without ``init`` (a wrapper that only applies, such as QAT's) counts as loop-fast."""
    if not hasattr(model, "init"):
        return False
    x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})

    def loss(p, bs, x):
        logits, _ = _forward(model, p, bs, x, train=True)
        return jnp.sum(logits)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, batch_stats, x).jaxpr
    return any(not (tuple(map(tuple, p["dimension_numbers"])) == _LOOP_FAST_CONV
                    and p["feature_group_count"] == 1 and p["batch_group_count"] == 1)
               for p in _conv_params(jaxpr))


def _conv_params(jaxpr) -> Iterable[dict]:
    """Params of every ``conv_general_dilated`` in ``jaxpr`` and the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            yield eqn.params
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _conv_params(sub)


def make_batch_fn(augment: Callable | None, window: int = 0) -> Callable:
    """``(state, x_train, y_train, i [B], data_key uint32 [2]) -> (x [B, ...], y [B])`` of one member.

    Gathers the batch by index; with an augmentation (:data:`lth.data.AUGMENTATIONS`) the inputs are
    augmented with :func:`lth.data.augment_key` of the member's data key and its global step, so a
    step's augmentation is the same in a population or alone, resumed or not.

    ``window`` T > 0 (text, :class:`lth.data.TextDataset`): ``x_train`` is the train byte stream ``[L]``
    and ``i`` are window starts: ``x = stream[i:i+T]``, ``y = stream[i+1:i+T+1]``, both ``[B, T]``.
    """
    def batch(state, x_train, y_train, i, data_key):
        if window:
            pos = i[:, None] + jnp.arange(window, dtype=i.dtype)
            return x_train[pos], x_train[pos + 1].astype(jnp.int32)
        x = x_train[i]
        if augment is not None:
            x = augment(augment_key(jax.random.wrap_key_data(data_key), state.step), x)
        return x, y_train[i]

    return batch


def make_segment_fn(model, tx: optax.GradientTransformation, lr_fn: optax.Schedule, shared_order: bool,
                    member_batch: int | None = None, augment: Callable | None = None,
                    window: int = 0, mask_fn: MaskFn | None = None) -> Callable:
    """Compiled ``(pop_state [K], x_train, y_train, idx, data_keys [K, 2], t0, args [K]) -> (pop_state,
    metrics [K, S])``; ``t0``: the global step of the segment's first step; ``args``: the members'
    ``mask_fn`` arguments (:func:`make_train_step`); ``window``: text data's context (windows gathered
    from the token stream).

    ``idx`` holds the example indices of S steps: ``[S, B]`` shared by all members or ``[K, S, B]``.
    The data set stays resident; each step gathers its batch by index inside the scan and augments
    it there (``augment``, keyed by the member's ``data_keys`` row and step: :func:`make_batch_fn`).
    Members are computed ``member_batch`` at a time (:func:`population_program`).
    """
    step = make_train_step(model, tx, lr_fn, mask_fn)
    batch = make_batch_fn(augment, window)

    def member(state, x_train, y_train, idx, data_key, t0, arg):
        def body(s, it):
            i, t = it
            return step(s, *batch(s, x_train, y_train, i, data_key), t, arg)

        # the step counter of the scan, not of the (per-member) state: unbatched under vmap
        return jax.lax.scan(body, state, (idx, t0 + jnp.arange(idx.shape[0], dtype=jnp.int32)))

    pop = population_program(member, (0, None, None, None if shared_order else 0, 0, None, 0), member_batch)
    return jax.jit(pop, donate_argnums=(0,))


def make_step_fn(model, tx: optax.GradientTransformation, lr_fn: optax.Schedule, shared_order: bool,
                 member_batch: int | None = None, augment: Callable | None = None,
                 window: int = 0, mask_fn: MaskFn | None = None) -> Callable:
    """Compiled ``(pop_state [K], x_train, y_train, idx, data_keys [K, 2], t, args [K]) -> (pop_state,
    metrics [K])``: one step (global step ``t``).

    The "step" segment strategy (:func:`segment_strategy`): the same step as :func:`make_segment_fn`'s
    scan body with no loop around it; ``idx`` ``[B]`` (shared) or ``[K, B]`` is already on the device,
    the batch is gathered (and augmented) there, the state's buffers are donated. Member groups are
    unrolled.
    """
    step = make_train_step(model, tx, lr_fn, mask_fn)
    batch = make_batch_fn(augment, window)

    def member(state, x_train, y_train, idx, data_key, t, arg):
        return step(state, *batch(state, x_train, y_train, idx, data_key), t, arg)

    pop = population_program(member, (0, None, None, None if shared_order else 0, 0, None, 0), member_batch,
                             unroll=True)
    return jax.jit(pop, donate_argnums=(0,))


@functools.lru_cache(maxsize=4096)
def data_key_data(seed: int) -> np.ndarray:
    """``key_data(jax.random.key(seed))`` on the host: the raw data key of a member's data seed.

    ``jax.random.key`` keeps only the low 32 bits of a seed (without x64), so the high part of a larger
    data seed (a stability copy's ``seed + copy * 2**32``) is folded in: copies get their own augmentation."""
    key = jax.random.key(seed & 0xFFFFFFFF)
    if seed >> 32:
        key = jax.random.fold_in(key, seed >> 32)
    return np.asarray(jax.random.key_data(key))


def _eval_chunk(model, params, batch_stats, x, y, v):
    """(sum of losses, number correct) over the valid examples of one chunk."""
    logits, _ = _forward(model, params, batch_stats, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    if loss.ndim > 1:  # a label per token (y [n, T]): each example's mean over its tokens
        loss, correct = (a.reshape(a.shape[0], -1).mean(1) for a in (loss, correct))
    return jnp.sum(loss * v), jnp.sum(correct * v)


def make_eval_fn(model, member_batch: int | None = None, segment: str = "scan") -> Callable:
    """``(params [K], batch_stats [K], xs [C, n, ...], ys [C, n], valid [C, n]) -> (loss [K], acc [K])``.

    "scan": one compiled program scans the C chunks. "step" (:func:`segment_strategy`): one compiled
    program per chunk, dispatched from the host, adding to the running sums in the same order.
    """
    def finish(loss_sum, correct_sum, valid):
        n = jnp.sum(valid)
        return loss_sum / n, correct_sum / n

    if segment == "scan":
        def member(params, batch_stats, xs, ys, valid):
            def chunk(carry, inp):
                loss, correct = _eval_chunk(model, params, batch_stats, *inp)
                return (carry[0] + loss, carry[1] + correct), None

            (loss_sum, correct_sum), _ = jax.lax.scan(chunk, (jnp.float32(0), jnp.float32(0)), (xs, ys, valid))
            return finish(loss_sum, correct_sum, valid)

        return jax.jit(population_program(member, (0, 0, None, None, None), member_batch))

    def member_chunk(params, batch_stats, x, y, v, loss_sum, correct_sum):
        loss, correct = _eval_chunk(model, params, batch_stats, x, y, v)
        return loss_sum + loss, correct_sum + correct

    pop = population_program(member_chunk, (0, 0, None, None, None, 0, 0), member_batch, unroll=True)

    @functools.partial(jax.jit, donate_argnums=(6, 7))
    def chunk(params, batch_stats, xs, ys, valid, c, loss_sum, correct_sum):
        at = functools.partial(jax.lax.dynamic_index_in_dim, index=c, keepdims=False)
        return pop(params, batch_stats, at(xs), at(ys), at(valid), loss_sum, correct_sum)

    done = jax.jit(finish)

    def evaluate(params, batch_stats, xs, ys, valid):
        leaf = jax.tree.leaves(params)[0]
        sums = jax.device_put((np.zeros(leaf.shape[0], np.float32),) * 2, leaf.sharding)
        for c in range(xs.shape[0]):
            sums = chunk(params, batch_stats, xs, ys, valid, np.int32(c), *sums)
        return done(*sums, valid)

    return evaluate


def chunk_split(x: np.ndarray, y: np.ndarray, chunk: int, chunks: int | None = None):
    """Pad a split to whole chunks: (xs [C, n, ...], ys [C, n], valid [C, n]) on the device.

    ``chunks``: pad to at least this many chunks of exactly ``chunk`` examples (so several splits
    share one shape, hence one compiled evaluation program).
    """
    n = len(x)
    chunk = max(1, min(chunk, n)) if chunks is None else chunk
    c = max(math.ceil(n / chunk), chunks or 0)
    pad = c * chunk - n
    xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(c, chunk, *x.shape[1:])
    ys = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)]).reshape(c, chunk, *y.shape[1:])  # y [N] or [N, T]
    valid = (np.arange(c * chunk) < n).astype(np.float32).reshape(c, chunk)
    return jax.device_put((xs, ys, valid))  # a host copy: jnp.asarray would compile a program per shape


def population_sharding(k: int) -> jax.sharding.Sharding:
    """Shard a leading population axis of size k over as many local devices as divide it.

    One device (the usual CPU case) gives a single-device sharding, the same program as no sharding.
    """
    devices = jax.local_devices()
    n = max(d for d in range(1, len(devices) + 1) if k % d == 0)
    mesh = jax.sharding.Mesh(np.array(devices[:n]), ("population",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("population"))


# ---------------------------------------------------------------------------- data order

class DataOrder:
    """Batch indices of every step: epoch e of data seed s is ``permutation(n, rng=[s, e])``.

    A pure function of (seed, step), so a resumed or re-run training sees exactly the same batches.
    """

    def __init__(self, n_train: int, batch_size: int):
        self.n, self.b = n_train, batch_size
        self.spe = n_train // batch_size
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._perm:
            if len(self._perm) > 64:
                self._perm.clear()
            self._perm[key] = np.random.default_rng([seed, epoch]).permutation(self.n).astype(np.int32)
        return self._perm[key]

    def indices(self, seed: int, start: int, stop: int) -> np.ndarray:
        """``[stop - start, B]`` example indices of steps ``start .. stop-1``."""
        out = np.empty((stop - start, self.b), np.int32)
        for j, s in enumerate(range(start, stop)):
            e, i = divmod(s, self.spe)
            out[j] = self._permutation(seed, e)[i * self.b:(i + 1) * self.b]
        return out


# ---------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    state: TrainState  # final population state [K, ...]
    records: list[dict]  # tidy metric rows: member, step, split, loss, accuracy
    snapshots: dict[int, PyTree] = field(default_factory=dict)  # step -> {params, batch_stats} [K, ...] (host)
    diverged: dict[int, int] = field(default_factory=dict)  # member -> first diverged step (see diverged_steps)
    # the mask_fn's info of every step (Engine(mask_fn=...)): {(global step t): info [K, ...]} (host)
    mask_info: dict[int, PyTree] = field(default_factory=dict)

    def select(self, members: Sequence[int]) -> "TrainResult":
        """The result of the members ``members`` (renumbered 0..len-1 in that order), on the host."""
        idx = np.asarray(members, np.int32)
        pos = {int(k): j for j, k in enumerate(idx)}

        def take(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # keys have no numpy form
                return x[jax.device_put(idx)]
            return np.asarray(x)[idx]

        return TrainResult(
            state=jax.tree.map(take, self.state),
            records=[{**r, "member": pos[r["member"]]} for r in self.records if r["member"] in pos],
            snapshots={s: jax.tree.map(take, t) for s, t in self.snapshots.items()},
            diverged={pos[k]: v for k, v in self.diverged.items() if k in pos},
            mask_info={s: jax.tree.map(take, t) for s, t in self.mask_info.items()})


# Most batch indices one segment gathers (int32: 64 MiB); longer segments run as several pieces.
SEGMENT_INDICES = 2**24


# A member diverged at the first step whose training loss is not finite or exceeds this multiple of
# its first-step loss (at least 1: a run that starts near zero loss, e.g. fine-tuning, needs a loss
# of 100 to count). Its row keeps training with the others; metrics record the step (diverged_step).
DIVERGENCE_FACTOR = 100.0


def diverged_steps(loss: np.ndarray, first_loss: np.ndarray, pos: int) -> dict[int, int]:
    """member -> global step of the first diverged loss in ``loss [K, T]`` (steps pos+1 .. pos+T).

    ``first_loss [K]`` is each member's loss at the first step of the run (see DIVERGENCE_FACTOR).
    """
    limit = DIVERGENCE_FACTOR * np.maximum(np.nan_to_num(first_loss, nan=1.0, posinf=1.0), 1.0)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(loss) | (loss > limit[:, None])
    return {int(k): pos + 1 + int(np.argmax(bad[k])) for k in np.flatnonzero(bad.any(1))}


def eval_steps(cfg: TrainConfig, num_steps: int, spe: int) -> list[int]:
    every = cfg.eval_every or spe
    steps = list(range(every, num_steps, every))
    return steps + [num_steps]


def _placed_or_host(x, sharding):
    """``x`` itself when it is a device array with ``sharding`` already (or a PRNG key), else a host copy."""
    if not isinstance(x, jax.Array) or _is_key(x) or x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    return np.asarray(x)


PROGRAMS_KEPT = 128  # compiled programs shared in a process (engines, quant stages): the last 128 keys
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()


def shared_program(key: tuple | None, build: Callable[[], Any]) -> Any:
    """``build()``, or what it returned for an equal ``key`` before in this process (the last
    :data:`PROGRAMS_KEPT` keys are kept). A jitted function is traced and lowered once per argument
    shapes *per function object*: engines (every level, arm group and run of a sweep or a test file
    builds its own) and quant stages of equal settings that share the function skip tracing and
    lowering (about as costly as compiling a tiny program) and the persistent-cache read. Flax modules
    compare by value, so a model rebuilt from the same config finds its programs. What tracing reads
    from outside (the backend, ``$LTH_CPU_CONV_CHUNK_PIXELS``) is part of the key. ``key`` None or
    unhashable (a model with array fields): no sharing."""
    if key is None:
        return build()
    key = (key, jax.default_backend(), cpu_conv_chunk_pixels())
    try:
        hash(key)
    except TypeError:
        return build()
    if key not in _PROGRAMS:
        _PROGRAMS[key] = build()
        while len(_PROGRAMS) > PROGRAMS_KEPT:
            _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return _PROGRAMS[key]


def eval_program(model, member_batch: int | None = None, segment: str = "scan") -> Callable:
    """:func:`make_eval_fn` of ``model``, shared in the process (:func:`shared_program`)."""
    return shared_program(("eval", model, member_batch, segment), lambda: make_eval_fn(model, member_batch, segment))


class Engine:
    """Compiled programs for one (model, optimizer, data set); reused across levels and arms.

    Python only walks the segment boundaries (evaluations and snapshot steps); each segment runs as
    one compiled scan, or one compiled step after another where that is faster (``train.segment``,
    :func:`segment_strategy`).
    """

    def __init__(self, model, data, cfg: TrainConfig, lr_fn: optax.Schedule | None = None,
                 augment: str | None = None, mask_fn: MaskFn | None = None, lr_key: tuple | None = None):
        """``lr_fn`` replaces the configured schedule (e.g. a constant lr for fine-tuning); ``lr_key``, a
        hashable value that says what it computes (e.g. ``("constant", lr)``), lets engines of equal
        settings share their compiled programs (:func:`shared_program`; without it an ``lr_fn`` engine
        builds its own, as does one with a ``mask_fn``). ``augment``
        (a name of :data:`lth.data.AUGMENTATIONS`) augments the training batches; default the data
        set's own ``augment`` (``data.augment``), else none. Evaluation is never augmented.
        ``mask_fn``: a pure function of the global step that may change the masks inside the compiled
        segment (:func:`make_train_step`; e.g. sparse training's drop and grow); the engine knows
        nothing of what it does."""
        self.model, self.data, self.cfg = model, data, cfg
        self.augment = augment if augment is not None else getattr(data, "augment", "none")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; available: {', '.join(AUGMENTATIONS)}")
        aug_fn = AUGMENTATIONS[self.augment]
        if aug_fn is not None and np.ndim(data.x_train) != 4:
            raise ValueError(f"augmentation {self.augment!r} needs images [N, H, W, C]; the train split has "
                             f"shape {np.shape(data.x_train)}")
        self.tx = tx = make_optimizer(cfg)
        self.order = DataOrder(len(data.x_train), cfg.batch_size)
        self.num_steps = total_steps(cfg, len(data.x_train))
        own_lr = lr_fn is not None
        self.lr_fn = lr_fn = lr_fn if lr_fn is not None else make_schedule(cfg, self.num_steps)
        # text (lth.data.TextDataset): the train byte stream is resident, batches are windows gathered
        # from it by start index; every window has the same length, so the mean over windows of a
        # window's mean token loss is the mean token loss
        self.window = int(getattr(data, "context", 0)) if getattr(data, "train_tokens", None) is not None else 0
        if self.window:
            self.x_train = self.y_train = jax.device_put(np.asarray(data.train_tokens))
        else:
            self.x_train = jax.device_put(np.asarray(data.x_train))
            self.y_train = jax.device_put(np.asarray(data.y_train))
        self.eval_sets = {name: chunk_split(x, y, cfg.eval_batch_size)
                          for name, x, y in (("val", data.x_val, data.y_val), ("test", data.x_test, data.y_test))
                          if len(x)}
        self.member_batch = mb = member_batch_size(cfg)
        self.segment = segment_strategy(cfg, model, np.shape(data.x_train)[1:])
        make = make_segment_fn if self.segment == "scan" else make_step_fn
        self.mask_fn = mask_fn
        # the programs depend on the model and these settings only (the data are arguments)
        key = None
        if mask_fn is None and (lr_key is not None or not own_lr):
            key = ("segment", model, cfg, self.num_steps, lr_key, mb, self.augment, self.window, self.segment)
        self._segment = shared_program(key, lambda: {
            shared: make(model, tx, lr_fn, shared, mb, aug_fn, window=self.window, mask_fn=mask_fn)
            for shared in (True, False)})
        self._eval = eval_program(model, mb, self.segment)
        self._remask = None

    def init(self, params, batch_stats, masks, rngs, start: int = 0) -> TrainState:
        """Population state at global step ``start`` (the schedule resumes there) with fresh optimizer moments.

        The population axis is sharded over the local devices (see :func:`population_sharding`).
        """
        sharding = population_sharding(int(jax.tree.leaves(rngs)[0].shape[0]))
        # placed on the devices first (host copies of numpy inputs), so the init program's outputs
        # are sharded already: no resharding programs afterwards. A device array placed otherwise goes
        # through the host: resharding it on the devices compiles a slicing program per leaf shape
        params, batch_stats, masks = jax.tree.map(lambda x: _placed_or_host(x, sharding), (params, batch_stats, masks))
        params, batch_stats, masks, rngs = jax.device_put((params, batch_stats, masks, rngs), sharding)
        state = init_population_state(params, batch_stats, masks, self.tx, rngs, start)
        return jax.device_put(state, sharding)

    def remask(self, state: TrainState, masks) -> TrainState:
        """The population ``state`` with new masks ``[K, ...]`` (see :func:`remask`); training continues."""
        if self._remask is None:
            self._remask = jax.jit(jax.vmap(lambda st, m: remask(st, m, self.tx)), donate_argnums=(0,))
        return self._remask(state, masks)

    def evaluate(self, state: TrainState) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """split -> (loss [K], accuracy [K]) on the val and test splits."""
        out = {}
        for name, (xs, ys, valid) in self.eval_sets.items():
            loss, acc = self._eval(state.params, state.batch_stats, xs, ys, valid)
            out[name] = (np.asarray(loss), np.asarray(acc))
        return out

    def _train_segment(self, state: TrainState, idx: np.ndarray, shared: bool,
                       keys: np.ndarray, t0: int = 0, args=None) -> tuple[TrainState, dict]:
        """Train over the example indices ``idx`` (``[S, B]`` shared or ``[K, S, B]``) with the members'
        data keys ``keys [K, 2]`` from global step ``t0``, the configured way (:func:`segment_strategy`):
        ``(state, {loss, accuracy} [K, S] on the host)``; ``args [K]``: the members' ``mask_fn`` arguments."""
        by_member = population_sharding(keys.shape[0])
        where = None if shared else by_member
        keys = jax.device_put(keys, by_member)
        args = jax.device_put(np.zeros(keys.shape[0], np.int32) if args is None else args, by_member)
        if self.segment == "scan":
            state, m = self._segment[shared](state, self.x_train, self.y_train, jax.device_put(idx, where), keys,
                                             np.int32(t0), args)
            return state, jax.device_get(m)
        # every step's indices go to the device in one transfer; the steps are queued without waiting
        rows = jax.device_put(list(idx) if shared else list(idx.swapaxes(0, 1)), where)
        ms = []
        for j, i in enumerate(rows):
            state, m = self._segment[shared](state, self.x_train, self.y_train, i, keys, np.int32(t0 + j), args)
            ms.append(m)
        ms = jax.device_get(ms)
        return state, jax.tree.map(lambda *xs: np.stack(xs, 1), *ms)

    @staticmethod
    def _snapshot(state: TrainState) -> PyTree:
        return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})

    def run(self, state: TrainState, data_seeds: Sequence[int], *, start: int = 0, stop: int | None = None,
            snapshot_steps: Iterable[int] = (), progress: Callable[[int, dict], None] | None = None,
            evaluate: bool = True, observe_steps: Iterable[int] = (),
            observe: Callable[[int, PyTree], None] | None = None, member_args=None) -> TrainResult:
        """Train the population from step ``start`` to ``stop`` (default: the configured length).

        ``data_seeds[k]`` fixes member k's batch order and, with ``data.augment``, its augmentation
        (all equal or ``shared_data_order``: one order and one augmentation, those of ``data_seeds[0]``).
        Evaluates at the eval steps (``evaluate=False``: records the training loss only), keeps a host
        copy of params and batch_stats at each snapshot step. ``observe(step, host copy)`` is called at
        each of ``observe_steps`` (e.g. epoch ends) and nothing is kept; extra segment boundaries change
        no numbers (the batch order is a function of the step). ``member_args [K]`` (int): each member's
        argument of the engine's ``mask_fn`` (default 0); its per-step info lands in ``mask_info``.
        """
        stop = self.num_steps if stop is None else stop
        seeds = [int(s) for s in data_seeds]
        shared = self.cfg.shared_data_order or len(set(seeds)) == 1
        evals = [s for s in eval_steps(self.cfg, self.num_steps, self.order.spe) if start < s <= stop]
        if not evals or evals[-1] != stop:
            evals.append(stop)
        snaps = {s for s in snapshot_steps if start <= s <= stop}
        watch = {s for s in observe_steps if start <= s <= stop} if observe is not None else set()
        bounds = sorted(set(evals) | {s for s in snaps | watch if s > start})
        # no segment's batch indices ([S, B] per member, on the host and the device) above
        # SEGMENT_INDICES: a long segment (QAT's single one, a large eval_every) is cut into pieces
        piece = max(1, SEGMENT_INDICES // (self.cfg.batch_size * (1 if shared else len(seeds))))
        bounds = sorted(set(bounds) | {p for a, b in zip([start, *bounds], bounds) for p in range(a + piece, b, piece)})
        records: list[dict] = []
        snapshots: dict[int, PyTree] = {}
        if start in snaps:
            snapshots[start] = self._snapshot(state)
        if start in watch:
            observe(start, self._snapshot(state))
        K = len(seeds)
        keys = np.stack([data_key_data(seeds[0] if shared else s) for s in seeds])
        diverged: dict[int, int] = {}
        mask_info: dict[int, PyTree] = {}
        args = None if member_args is None else np.asarray(member_args, np.int32)
        first_loss = None
        pos, acc_loss, acc_acc, acc_n = start, np.zeros(K), np.zeros(K), 0
        for b in bounds:
            if shared:
                idx = self.order.indices(seeds[0], pos, b)
            else:
                idx = np.stack([self.order.indices(s, pos, b) for s in seeds])
            state, m = self._train_segment(state, idx, shared, keys, pos, args)
            if "mask" in m:
                for j in range(b - pos):
                    mask_info[pos + j] = jax.tree.map(lambda x: x[:, j], m["mask"])
            loss = np.asarray(m["loss"], np.float64)
            acc = np.asarray(m["accuracy"], np.float64)
            if first_loss is None:
                first_loss = loss[:, 0]
            for k, step in diverged_steps(loss, first_loss, pos).items():
                diverged.setdefault(k, step)
            acc_loss += loss.sum(1)
            acc_acc += acc.sum(1)
            acc_n += loss.shape[1]
            pos = b
            if b in snaps:
                snapshots[b] = self._snapshot(state)
            if b in watch:
                observe(b, snapshots[b] if b in snaps else self._snapshot(state))
            if b in evals:
                rows = {"train": (acc_loss / acc_n, acc_acc / acc_n)}
                if evaluate:
                    rows.update(self.evaluate(state))
                for split, (l, a) in rows.items():
                    for k in range(K):
                        records.append({"member": k, "step": b, "split": split,
                                        "loss": float(l[k]), "accuracy": float(a[k]),
                                        **(lm_metrics(float(l[k])) if self.window else {})})
                acc_loss, acc_acc, acc_n = np.zeros(K), np.zeros(K), 0
                if progress is not None:
                    progress(b, {s: (float(np.mean(l)), float(np.mean(a))) for s, (l, a) in rows.items()})
        return TrainResult(state=state, records=records, snapshots=snapshots, diverged=diverged, mask_info=mask_info)


def is_language_model(data) -> bool:
    """Whether ``data`` is a text corpus (:class:`lth.data.TextDataset`: next-token prediction over bytes),
    whose models are judged by bits per byte (lower is better) rather than accuracy."""
    return getattr(data, "train_tokens", None) is not None


def lm_metrics(loss: float) -> dict[str, float]:
    """A language model's metrics from its mean next-token loss (nats per token, bytes as tokens):
    ``perplexity = exp(loss)`` and ``bits_per_byte = loss / ln 2``."""
    return {"perplexity": float(np.exp(loss)), "bits_per_byte": float(loss / np.log(2))}


def early_stop_steps(records: list[dict]) -> dict[int, int]:
    """member -> first step of minimum validation loss; empty without a val split (``data.val_size = 0``):
    the early-stop step is selected on validation only, never on test."""
    best: dict[int, tuple[float, int]] = {}
    for r in records:
        if r["split"] != "val":
            continue
        loss = r["loss"] if np.isfinite(r["loss"]) else np.inf
        if r["member"] not in best or loss < best[r["member"]][0]:
            best[r["member"]] = (loss, r["step"])
    return {k: v[1] for k, v in best.items()}


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack members into a population ``[K, ...]``: numpy on the host (device arrays are copied there
    first), so no device program is compiled per leaf shape and K; PRNG keys (no numpy form) with jax."""
    def one(*xs):
        if any(_is_key(x) for x in xs):
            return jnp.stack(xs)
        return np.stack([np.asarray(x) for x in xs])

    return jax.tree.map(one, *trees)


def unstack(tree: PyTree, k: int) -> PyTree:
    return jax.tree.map(lambda x: x[k], tree)

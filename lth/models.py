"""Model registry: Flax linen networks of the Lottery Ticket literature, built by name.

``build_model(cfg, num_classes, input_shape)`` returns a ``flax.linen.Module`` whose
``__call__(x, train=False)`` maps a batch ``[B, *input_shape]`` to logits ``[B, num_classes]``.
Adding a model is one builder function plus ``@register("name")``.

Naming convention of the ``params`` tree (pruning relies on it, see :func:`layer_kind`):

- fully-connected hidden layers are ``dense_0, dense_1, ...``;
- convolutions are ``conv_0, conv_1, ...`` (a residual projection is ``conv_shortcut``);
- batch norms are ``bn_0, bn_1, ...`` (``bn_shortcut``), with ``scale``/``bias`` params and
  ``mean``/``var`` in the ``batch_stats`` collection;
- the last layer of every model is a top-level ``Dense`` named ``output`` (:data:`OUTPUT`);
- ResNet blocks are submodules ``stage{s}_block{b}`` (s from 1, b from 0).

Models without batch norm (mlp, lenet_300_100, conv2/4/6) have no ``batch_stats`` collection.
The ``width`` multiplier scales every hidden layer to ``max(1, round(base * width))`` units or
channels (:func:`scale_width`); the output layer always has ``num_classes`` units.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from . import registry
from . import transformer as tf
from .batchnorm import FusedBatchNorm
from .config import ModelConfig

PyTree = Any
Builder = Callable[[ModelConfig, int, tuple[int, ...]], nn.Module]

OUTPUT = "output"  # name of the last (classifier) layer in every model
POOL = "M"  # 2x2 max-pool marker in conv plans

MODELS: dict[str, Builder] = registry.MODELS.entries  # the built-in and registered builders by name

INITS: dict[str, Callable[[], Callable]] = {
    "glorot_normal": nn.initializers.glorot_normal,  # Frankle & Carbin 2019
    "kaiming_normal": nn.initializers.kaiming_normal,  # He et al. 2015 (he_normal, fan_in)
}


@dataclass(frozen=True)
class Structure:
    """What structured pruning, ``lth compact``, cross-layer equalization and integer inference need
    to know about a model's layers, declared by the model itself.

    A Module declares it with a method ``structure(self) -> Structure`` (no arguments; it may read
    the module's fields). A model without one gets ``Structure()``: weight and N:M pruning only.

    - ``chain``: the forward pass when it is a plain chain of top-level layers, as ops
      ``{"op": "dense" | "conv", "layer": name, "relu": bool}`` (``"norm": bn_name`` when a batch
      norm follows the layer, before the ReLU; ``"strides"`` of a conv, default 1; convs use SAME
      padding), ``{"op": "pool"}`` (2x2 max, stride 2), ``{"op": "flatten"}`` and ``{"op": "gap"}``
      (global average pool over H, W). The last op is the output layer (no ReLU). Every layer with a
      kernel must be in it. With a chain, ``prune.granularity = "filter"`` removes conv filters and
      ``"neuron"`` hidden dense units (with their bias, batch-norm entries and the next layer's
      inputs); without batch norm and pooling other than 2x2 max, ``lth compact`` builds the smaller
      network (:class:`ChainNet`) and quantized tickets run in integers (no "gap" either).
    - ``blocks``: top-level submodules that are residual blocks ``y = relu(x + f(x))`` with an identity
      shortcut, on post-ReLU inputs, whose every parameter belongs to the branch ``f`` and makes
      ``f(x) = 0`` when masked (convs with batch norm do): ``prune.granularity = "layer"`` drops them.

    - ``output``: the layers (module paths, ``"head"`` or ``"block/fc"``) that are output layers, pruned
      at ``prune.output_rate`` (default: the top-level layer :data:`OUTPUT`).
    - ``frozen``: layers (module paths or their prefixes) never pruned nor quantized, e.g. an
      embedding or a layer norm whose leaves are neither kernels, biases nor batch norms.

    - ``kinds``: ``(layer or prefix, kind)`` pairs naming groups of layers for ``prune.rates``, e.g.
      ``("block_0/attn", "attn")``: a rate keyed by a kind applies to every kernel of its layers (a rate
      keyed by the layer's own name wins). Transformers declare ``attn``, ``mlp``, ``embed``, ``head``.
    - ``spared``: layers (or prefixes) with kernels that are pruned only when ``prune.rates`` names them
      or their kind (a transformer's embedding and head); they are not prunable otherwise, so densities
      count the other layers only.
    - ``heads``: ``(attention module, number of heads)`` of every multi-head attention whose ``q``,
      ``k``, ``v`` (head h: output columns ``h * d .. (h + 1) * d``) and ``out`` (the same input rows)
      are Dense submodules: ``prune.granularity = "head"`` removes whole heads.
    - ``mlps``: ``(layer, next layer)`` of every two-layer MLP ``next(act(layer(x)))`` inside a block whose
      activation maps 0 to 0 (ReLU, GELU), both Dense submodules: ``prune.granularity = "neuron"`` removes
      hidden unit c (column c of ``layer``'s kernel and bias, row c of ``next``'s kernel), as it removes
      the hidden units of a chain; a transformer's feed-forward layers.

    Which leaves are prunable follows (:func:`layer_kind`): every ``kernel`` outside ``frozen`` and
    ``spared``; biases with ``prune.prune_biases``; never norms.
    """

    chain: tuple[dict, ...] | None = None
    blocks: tuple[str, ...] = ()
    output: tuple[str, ...] = ("output",)
    frozen: tuple[str, ...] = ()
    kinds: tuple[tuple[str, str], ...] = ()
    spared: tuple[str, ...] = ()
    heads: tuple[tuple[str, int], ...] = ()
    mlps: tuple[tuple[str, str], ...] = ()

    def kind_of(self, layer: str) -> str | None:
        """The declared rate kind of ``layer`` (a module path), or None."""
        return next((k for p, k in self.kinds if layer == p or layer.startswith(p + "/")), None)

    def is_spared(self, layer: str) -> bool:
        return any(layer == p or layer.startswith(p + "/") for p in self.spared)

    def chain_layers(self) -> list[dict]:
        """The kernel ops of the chain (``dense``/``conv``), in forward order; [] without a chain."""
        return [op for op in self.chain or () if op["op"] in ("dense", "conv")]


def structure_of(model) -> Structure:
    """The :class:`Structure` ``model`` declares (its ``structure()`` method), else ``Structure()``."""
    fn = getattr(model, "structure", None)
    if not callable(fn):
        return Structure()
    st = fn()
    if not isinstance(st, Structure):
        raise ValueError(f"{type(model).__name__}.structure() returned a {type(st).__name__}, not a "
                         "lth.models.Structure")
    return st


def _dense_op(layer: str, relu: bool = True) -> dict:
    return {"op": "dense", "layer": layer, "relu": relu}


def _conv_plan_ops(plan, norms: bool) -> list[dict]:
    ops, i = [], 0
    for item in plan:
        if item == POOL:
            ops.append({"op": "pool"})
        else:
            ops.append({"op": "conv", "layer": f"conv_{i}", "relu": True, **({"norm": f"bn_{i}"} if norms else {})})
            i += 1
    return ops


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding ``builder(cfg, num_classes, input_shape) -> Module`` to :data:`MODELS`."""

    def deco(builder: Builder) -> Builder:
        return registry.MODELS.register(name, builder)

    return deco


def build_model(cfg: ModelConfig, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """The model ``cfg.name`` (a registered name, entry point or ``"package.module:builder"``, see
    :mod:`lth.registry`) for inputs ``[B, *input_shape]`` and ``num_classes`` logits.

    Raises ValueError when the name is unknown, the init scheme is unknown, the input shape does
    not fit the architecture (e.g. a conv net on a 1-D data set), or a builder returns no Module.
    """
    try:
        builder = registry.MODELS.resolve(cfg.name)
    except registry.RegistryError as e:
        raise ValueError(str(e)) from None
    if cfg.init not in INITS:
        raise ValueError(f"unknown init {cfg.init!r}; allowed: {', '.join(INITS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    module = registry.MODELS.call(cfg.name, builder, cfg, int(num_classes), tuple(int(d) for d in input_shape))
    if not isinstance(module, nn.Module):
        raise ValueError(f"model builder {cfg.name!r} returned a {type(module).__name__}, not a flax.linen.Module")
    return module


def check_output_width(model: nn.Module, num_classes: int, input_shape: Sequence[int]) -> None:
    """ValueError unless ``model`` maps ``[B, *input_shape]`` to logits ``[B, num_classes]`` (traced
    abstractly: nothing is computed). Too many logits would train classes no label names; too few (or
    labels >= the logits) run to NaN."""
    x = jax.ShapeDtypeStruct((2, *(int(d) for d in input_shape)), jnp.float32)

    def logits(x):
        return model.apply(model.init(jax.random.key(0), x, train=False), x, train=False)

    try:
        shape = tuple(jax.eval_shape(logits, x).shape)
    except Exception as e:  # a user model that does not run on this input: say which, in one line
        raise ValueError(f"the model does not run on inputs of shape {tuple(input_shape)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if shape != (2, num_classes) and shape != (2, *(int(d) for d in input_shape), num_classes):  # or per token
        width = shape[-1] if len(shape) == 2 else shape
        raise ValueError(f"the model gives logits of width {width} (output shape {shape} for a batch of 2), but the "
                         f"data set has {num_classes} classes; its output layer must have num_classes = "
                         f"{num_classes} units (the builder's second argument)")


def scale_width(base: int, width: float) -> int:
    """Hidden width after the multiplier: ``max(1, round(base * width))``."""
    return max(1, round(base * width))


# ---------------------------------------------------------------------------- layers

def _dense(features: int, init: str | Callable, name: str) -> nn.Dense:
    # init: a name in INITS, or an initializer (lth.prune.baselines.narrow_init draws unscaled noise with one)
    kernel_init = INITS[init]() if isinstance(init, str) else init
    return nn.Dense(features, kernel_init=kernel_init, bias_init=nn.initializers.zeros, name=name)


def _conv(features: int, init: str, name: str, *, kernel: int = 3, strides: int = 1,
          use_bias: bool = True) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                   use_bias=use_bias, kernel_init=INITS[init](), bias_init=nn.initializers.zeros,
                   name=name, conv_general_dilated=loop_friendly_conv)


_NHWC = ("NHWC", "HWIO", "NHWC")


def loop_friendly_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                       dimension_numbers=None, feature_group_count=1, precision=None,
                       preferred_element_type=None):
    """``lax.conv_general_dilated`` (the ``nn.Conv`` hook) whose gradients are NHWC/HWIO convolutions too.

    XLA's CPU backend runs a convolution on its fast (Eigen) kernel only in the layout NHWC x HWIO
    -> NHWC; it rewrites the others into that layout at the top level of a program but not inside
    a loop body. jax's input and weight gradients of a convolution come in other layouts, so a
    train step inside ``lax.scan`` (one compiled segment, :mod:`lth.train`) ran them as naive loop
    nests: Conv-2 12 s per step against 0.2 s for the same step at the top level (jax-ml/jax#12868),
    with different rounding. Here the forward is the plain convolution and the gradients are written
    as canonical convolutions (what XLA's top-level rewrite produces), so a step in a scan runs the
    same kernels as a top-level step: as fast, and bitwise identical. Other backends, and convs this
    does not cover (grouped, dilated, other layouts), get ``lax.conv_general_dilated`` unchanged.
    """
    plain = (jax.default_backend() == "cpu" and lhs.ndim == 4 and feature_group_count == 1
             and precision is None and preferred_element_type is None
             and all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, preferred_element_type=preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return _nhwc_conv(lhs, rhs, strides, tuple((int(lo), int(hi)) for lo, hi in padding))


# Batch chunking of the CPU convolutions. XLA's CPU convolution (Eigen) slows down per example as the
# batch grows, most of all the weight gradient, which contracts over N x H x W: measured one thread,
# Conv-2's 64 -> 64 conv at batch 128 ran its weight gradient at 25 GFLOP/s and at 64 GFLOP/s in
# pieces of 8 examples (docs/notes/convspeed.md). So on the CPU a convolution's input gradient
# and weight gradient run on pieces of at most CPU_CONV_CHUNK_PIXELS input pixels (N x H x W,
# at least 1 example, at most CPU_CONV_MAX_PIECES pieces), unrolled in the program; the weight
# gradient is the sum of the pieces'. The forward runs on the same pieces: on one thread a whole-batch
# forward and a scan over the gradient pieces were as fast, but on 2 threads the unrolled pieces were
# 12-15% faster (docs/speed.md). Per example the numbers are those of the whole batch (a convolution of
# one example does not read another); the weight gradient differs in float rounding (another
# summation order).
# ``LTH_CPU_CONV_CHUNK_PIXELS=0`` turns it off (one piece); another number sets the limit.
CPU_CONV_CHUNK_PIXELS = 2048
CPU_CONV_MAX_PIECES = 4


def cpu_conv_chunk_pixels() -> int:
    """The pixel limit of a CPU convolution's batch pieces: ``$LTH_CPU_CONV_CHUNK_PIXELS`` or
    :data:`CPU_CONV_CHUNK_PIXELS`; 0 = no chunking. Read when a program is traced."""
    import os

    raw = os.environ.get("LTH_CPU_CONV_CHUNK_PIXELS", "").strip()
    if not raw:
        return CPU_CONV_CHUNK_PIXELS
    if not raw.isdigit():
        raise ValueError(f"LTH_CPU_CONV_CHUNK_PIXELS={raw!r}: a whole number of pixels >= 0 (0 turns batch "
                         f"chunking of CPU convolutions off; default {CPU_CONV_CHUNK_PIXELS})")
    return int(raw)


def conv_chunk(n: int, h: int, w: int) -> int:
    """Examples per piece of a CPU convolution of a ``[n, h, w, C]`` batch (``n``: no chunking)."""
    limit = cpu_conv_chunk_pixels()
    if limit <= 0:
        return n
    return min(n, max(1, limit // (h * w), -(-n // CPU_CONV_MAX_PIECES)))


def conv_path(backend: str | None = None) -> str:
    """Which convolution code lth's conv layers run on ``backend`` (default: jax's), in words."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return f"{backend}: lax.conv_general_dilated (XLA's own kernels and gradients)"
    limit = cpu_conv_chunk_pixels()
    chunks = (f"forward and gradients on batch pieces of <= {limit} input pixels (at most {CPU_CONV_MAX_PIECES} "
              f"pieces, unrolled)" if limit else "whole batch (LTH_CPU_CONV_CHUNK_PIXELS=0)")
    return (f"cpu: NHWC x HWIO convolutions with NHWC gradients (loop_friendly_conv), {chunks}; "
            f"batch norm FusedBatchNorm; 2x2 max-pool max_pool_2x2 (reshape)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _nhwc_conv(x, w, strides, pads):
    """``x [N, H, W, C] * w [kh, kw, C, O] -> [N, H', W', O]``; it and its gradients (in the same layout)
    run on batch pieces of :func:`conv_chunk` examples, unrolled in the program."""
    c = conv_chunk(*x.shape[:3])
    if c >= x.shape[0]:
        return _nhwc_conv_plain(x, w, strides, pads)
    return jnp.concatenate([_nhwc_conv_plain(x[i:i + c], w, strides, pads) for i in range(0, x.shape[0], c)])


def _nhwc_conv_plain(x, w, strides, pads):
    if _gemm_conv_wanted(x, w):
        return _gemm_conv(x, w, strides, pads)
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def _gemm_conv_wanted(x, w) -> bool:
    """Whether a CPU convolution runs as im2col + one matmul: when the image is smaller than the kernel
    (VGG's 3x3 convs on 2x2 maps), where Eigen's convolution and its input gradient ran at ~1 GFLOP/s
    against ~90 on the same layer at 4x4 (one thread; docs/notes/convspeed.md)."""
    return x.shape[1] < w.shape[0] or x.shape[2] < w.shape[1]


def _patches(x, kernel, strides, pads):
    """im2col: ``x [N, H, W, C] -> [N, H', W', kh * kw * C]`` (taps in (kh, kw, C) order, as HWIO)."""
    (kh, kw), (sh, sw) = kernel, strides
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    return jnp.concatenate([xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                            for i in range(kh) for j in range(kw)], axis=-1)


def _gemm_conv(x, w, strides, pads):
    p = _patches(x, w.shape[:2], strides, pads)
    return (p.reshape(-1, p.shape[-1]) @ w.reshape(-1, w.shape[-1])).reshape(*p.shape[:3], w.shape[-1])


def _nhwc_conv_fwd(x, w, strides, pads):
    return _nhwc_conv(x, w, strides, pads), (x, w)


def _nhwc_conv_bwd(strides, pads, res, dy):
    x, w = res
    c = conv_chunk(*x.shape[:3])
    if c >= x.shape[0]:
        return _nhwc_conv_grads(strides, pads, x, w, dy)
    # The pieces are unrolled, not a scan: on 2 threads the unrolled pieces (forward and gradients) ran
    # Conv-2 b60/b128 and ResNet-20 b128 12-15% faster than a scan over them (independent pieces can
    # run side by side; a scan runs them one after the other), measured quiet (docs/speed.md).
    dxs, dw = [], None
    for i in range(0, x.shape[0], c):
        dxp, dwp = _nhwc_conv_grads(strides, pads, x[i:i + c], w, dy[i:i + c])
        dxs.append(dxp)
        dw = dwp if dw is None else dw + dwp
    return jnp.concatenate(dxs), dw


def _nhwc_conv_grads(strides, pads, x, w, dy):
    """(dx, dw) of ``_nhwc_conv_plain`` as NHWC x HWIO convolutions (or matmuls, :func:`_gemm_conv_wanted`)."""
    if _gemm_conv_wanted(x, w):
        p, to_x = jax.vjp(lambda x: _patches(x, w.shape[:2], strides, pads), x)
        d2 = dy.reshape(-1, dy.shape[-1])
        w2 = w.reshape(-1, w.shape[-1])
        dx, = to_x((d2 @ w2.T).reshape(p.shape))  # col2im: the transpose of the patch gather
        return dx, (p.reshape(-1, p.shape[-1]).T @ d2).reshape(w.shape)
    (kh, kw), (h, wd), (ho, wo) = w.shape[:2], x.shape[1:3], dy.shape[1:3]
    dims = list(zip(pads, (h, wd), (ho, wo), (kh, kw), strides))
    # dx: dy (dilated by the stride) * the flipped kernel with in/out swapped, [kh, kw, O, C]
    dx = jax.lax.conv_general_dilated(
        dy, w[::-1, ::-1].transpose(0, 1, 3, 2), (1, 1),
        [(k - 1 - lo, n - 1 - (m - 1) * s + lo) for (lo, _), n, m, k, s in dims],
        lhs_dilation=strides, dimension_numbers=_NHWC)
    # dw: channels as the batch, examples as the features: x^T [C, H, W, N] * dy^T [H', W', N, O]
    # (dilated by the stride) -> [C, kh, kw, O]; a negative pad crops rows no output looked at
    dw = jax.lax.conv_general_dilated(
        x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
        [(lo, k + (m - 1) * s - n - lo) for (lo, _), n, m, k, s in dims],
        rhs_dilation=strides, dimension_numbers=_NHWC)
    return dx, dw.transpose(1, 2, 0, 3)


_nhwc_conv.defvjp(_nhwc_conv_fwd, _nhwc_conv_bwd)


def _bn(train: bool, name: str) -> nn.Module:
    """Batch norm (momentum 0.9, epsilon 1e-5): on the CPU :class:`lth.batchnorm.FusedBatchNorm` (one-pass
    statistics, hand-written backward; same variables and numbers), elsewhere ``flax.linen.BatchNorm``."""
    if jax.default_backend() == "cpu":
        return FusedBatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2 (VALID): on the CPU :func:`max_pool_2x2` (reshape + max, gradient by mask),
    elsewhere ``flax.linen.max_pool``."""
    if jax.default_backend() == "cpu" and x.ndim == 4:
        return max_pool_2x2(x)
    return nn.max_pool(x, (2, 2), strides=(2, 2))


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """``x [N, H, W, C] -> [N, H // 2, W // 2, C]``, the max of each 2x2 window (a trailing odd row or
    column is dropped, as VALID pooling does). The same numbers as ``nn.max_pool(x, (2, 2), (2, 2))``,
    and the same gradient: all of a window's gradient goes to its first maximum in row-major order, as
    XLA's select-and-scatter does. Written as a reshape and a max (forward) and a compare-and-select
    (backward) because XLA's CPU select-and-scatter was the slowest part of a Conv-2 step
    (docs/notes/convspeed2.md)."""
    return _window_parts(x)[1]


def _window_parts(x):
    n, h, w, c = x.shape
    xr = x[:, :h - h % 2, :w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
    parts = [xr[:, :, i, :, j] for i in range(2) for j in range(2)]  # row-major window order
    return parts, functools.reduce(jnp.maximum, parts)


def _max_pool_fwd(x):
    parts, y = _window_parts(x)
    return y, (x, y)


def _max_pool_bwd(res, dy):
    x, y = res
    parts, _ = _window_parts(x)
    taken = jnp.zeros(y.shape, bool)
    grads = []
    for p in parts:
        hit = (p == y) & ~taken
        grads.append(jnp.where(hit, dy, jnp.zeros_like(dy)))
        taken = taken | hit
    n, h, w, c = x.shape
    dx = jnp.stack(grads, 3).reshape(n, h // 2, w // 2, 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    dx = dx.reshape(n, h - h % 2, w - w % 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


# ---------------------------------------------------------------------------- modules

ACTIVATIONS = "activations"  # collection of post-ReLU outputs, sown only when asked for (mutable)


def _relu(module: nn.Module, x: jax.Array, name: str) -> jax.Array:
    """ReLU whose output is sown into :data:`ACTIVATIONS` (a no-op unless that collection is mutable)."""
    y = nn.relu(x)
    module.sow(ACTIVATIONS, f"{name}_relu", y)  # suffixed: a sown name may not equal a submodule's
    return y


class MLP(nn.Module):
    """Flatten, ``dense_i`` + ReLU for each hidden width, then ``output``."""

    widths: tuple[int, ...]
    num_classes: int
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for i, w in enumerate(self.widths):
            x = _relu(self, _dense(w, self.init_scheme, f"dense_{i}")(x), f"dense_{i}")
        return _dense(self.num_classes, self.init_scheme, OUTPUT)(x)

    def structure(self) -> Structure:
        return Structure(chain=({"op": "flatten"}, *(_dense_op(f"dense_{i}") for i in range(len(self.widths))),
                                _dense_op(OUTPUT, relu=False)))


class ConvNet(nn.Module):
    """Frankle & Carbin (2019) Conv-2/4/6: 3x3 convs (ReLU) and 2x2 max-pools, flatten, FC, output.

    ``plan`` holds conv channel counts and :data:`POOL` markers; ``fc`` the hidden FC widths.
    """

    plan: tuple[int | str, ...]
    fc: tuple[int, ...]
    num_classes: int
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        i = 0
        for item in self.plan:
            if item == POOL:
                x = _max_pool(x)
            else:
                x = _relu(self, _conv(item, self.init_scheme, f"conv_{i}")(x), f"conv_{i}")
                i += 1
        x = x.reshape((x.shape[0], -1))
        for j, w in enumerate(self.fc):
            x = _relu(self, _dense(w, self.init_scheme, f"dense_{j}")(x), f"dense_{j}")
        return _dense(self.num_classes, self.init_scheme, OUTPUT)(x)

    def structure(self) -> Structure:
        return Structure(chain=(*_conv_plan_ops(self.plan, norms=False), {"op": "flatten"},
                                *(_dense_op(f"dense_{j}") for j in range(len(self.fc))), _dense_op(OUTPUT, relu=False)))


class VGG(nn.Module):
    """CIFAR VGG as in open_lth / Frankle et al. (2020): conv-BN-ReLU blocks, max-pools,
    global average pool, one ``output`` Dense. Convs have no bias (BN supplies the shift)."""

    plan: tuple[int | str, ...]
    num_classes: int
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        i = 0
        for item in self.plan:
            if item == POOL:
                x = _max_pool(x)
            else:
                x = _conv(item, self.init_scheme, f"conv_{i}", use_bias=False)(x)
                x = _relu(self, _bn(train, f"bn_{i}")(x), f"conv_{i}")
                i += 1
        x = jnp.mean(x, axis=(1, 2))
        return _dense(self.num_classes, self.init_scheme, OUTPUT)(x)

    def structure(self) -> Structure:
        return Structure(chain=(*_conv_plan_ops(self.plan, norms=True), {"op": "gap"}, _dense_op(OUTPUT, relu=False)))


class BasicBlock(nn.Module):
    """He et al. (2016) basic block: conv-BN-ReLU, conv-BN, + shortcut, ReLU.

    The shortcut is the identity, or a 1x1 ``conv_shortcut`` + ``bn_shortcut`` projection when the
    stride or channel count changes.
    """

    features: int
    strides: int = 1
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv(self.features, self.init_scheme, "conv_0", strides=self.strides, use_bias=False)(x)
        y = _relu(self, _bn(train, "bn_0")(y), "conv_0")
        y = _conv(self.features, self.init_scheme, "conv_1", use_bias=False)(y)
        y = _bn(train, "bn_1")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, self.init_scheme, "conv_shortcut", kernel=1, strides=self.strides,
                      use_bias=False)(x)
            x = _bn(train, "bn_shortcut")(x)
        return _relu(self, y + x, "out")


class ResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, Sec. 4.2): ``conv_0``/``bn_0`` stem, stages of basic blocks
    ``stage{s}_block{b}`` (stride 2 at the start of every stage after the first), global average
    pool, ``output`` Dense."""

    stem: int
    stages: tuple[int, ...]
    blocks_per_stage: int
    num_classes: int
    init_scheme: str = "glorot_normal"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.stem, self.init_scheme, "conv_0", use_bias=False)(x)
        x = _relu(self, _bn(train, "bn_0")(x), "conv_0")
        for s, feats in enumerate(self.stages):
            for b in range(self.blocks_per_stage):
                strides = 2 if s > 0 and b == 0 else 1
                x = BasicBlock(feats, strides, self.init_scheme, name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return _dense(self.num_classes, self.init_scheme, OUTPUT)(x)

    def structure(self) -> Structure:
        """Not a chain (residual connections); the blocks with an identity shortcut (same stride and
        channels as their input; the first block of every later stage projects) can be dropped."""
        blocks, channels = [], self.stem
        for s, feats in enumerate(self.stages):
            for b in range(self.blocks_per_stage):
                if not (s > 0 and b == 0) and channels == feats:
                    blocks.append(f"stage{s + 1}_block{b}")
                channels = feats
        return Structure(blocks=tuple(blocks))


def block_shapes(model) -> list[tuple[int, int]]:
    """``(heads, MLP hidden units)`` of each block of a :class:`ViT` or :class:`GPT`: its ``block_shapes``
    when set (the smaller model ``lth compact`` builds), else ``(heads, hidden)`` in all ``depth`` blocks."""
    if model.block_shapes:
        if len(model.block_shapes) != model.depth:
            raise ValueError(f"block_shapes has {len(model.block_shapes)} entries for {model.depth} blocks")
        return [tuple(s) for s in model.block_shapes]
    return [(model.heads, model.hidden)] * model.depth


def compacted_blocks(model, heads: dict[str, int], hidden: dict[str, int]) -> nn.Module:
    """``model`` (a :class:`ViT` or :class:`GPT`) with ``heads[attention]`` heads and ``hidden[first MLP
    layer]`` hidden units in the blocks its structure declares them for (the others as they are): the
    smaller model of :func:`lth.prune.compact_blocks.compact_blocks`."""
    st = model.structure()
    shapes = tuple((heads.get(attn, h), hidden.get(layer, u))
                   for (attn, _), (layer, _), (h, u) in zip(st.heads, st.mlps, block_shapes(model)))
    return model.clone(block_shapes=shapes)


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2021) with the pre-LN blocks of :mod:`lth.transformer`, on
    ``[B, H, W, C]`` images cut into non-overlapping ``patch x patch`` patches.

    ``pool``: "cls" (a learned token prepended; the head reads its final state) or "mean" (the head
    reads the mean over the patch tokens). Parameters: ``embed`` (Dense on flattened patches),
    ``pos/embedding`` ``[tokens, dim]``, ``cls/embedding`` ``[1, dim]`` (pool "cls" only),
    ``block_{i}/{ln_0, attn/{q, k, v, out}, ln_1, mlp/{fc_in, fc_out}}``, ``ln_f``, ``output``.
    """

    patch: int
    dim: int
    depth: int
    heads: int
    head_dim: int
    hidden: int
    num_classes: int
    pool: str = "cls"
    init_scheme: str = "glorot_normal"
    block_shapes: tuple[tuple[int, int], ...] = ()  # per block (heads, hidden) after compaction; () = uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)  # [B, tokens, patch pixels], row-major patches
        x = tf.dense(self.dim, self.init_scheme, "embed")(x)
        if self.pool == "cls":
            cls = tf.Embedding((1, self.dim), zeros=True, name="cls")()
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)), x], axis=1)
        x = x + tf.Embedding((x.shape[1], self.dim), name="pos")()
        for i, (heads, hidden) in enumerate(block_shapes(self)):
            x = tf.Block(heads, self.head_dim, hidden, self.init_scheme, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_f")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        return tf.dense(self.num_classes, self.init_scheme, OUTPUT)(x)

    def structure(self) -> Structure:
        """Attention and MLP kernels are pruned; the patch embedding and the head only when prune.rates
        names them (or their kinds ``embed``, ``head``); position embedding, CLS token and layer norms
        never (frozen)."""
        blocks = [f"block_{i}" for i in range(self.depth)]
        norms = tuple(f"{blk}/{ln}" for blk in blocks for ln in ("ln_0", "ln_1")) + ("ln_f",)
        kinds = ((("embed", "embed"), (OUTPUT, "head"))
                 + tuple((f"{blk}/attn", "attn") for blk in blocks) + tuple((f"{blk}/mlp", "mlp") for blk in blocks))
        return Structure(output=(OUTPUT,), frozen=("pos", "cls", *norms), kinds=kinds, spared=("embed", OUTPUT),
                         heads=tuple((f"{blk}/attn", h) for blk, (h, _) in zip(blocks, block_shapes(self))),
                         mlps=tuple((f"{blk}/mlp/fc_in", f"{blk}/mlp/fc_out") for blk in blocks))

    compacted = compacted_blocks  # lth compact: fewer heads and hidden units per block


class ChainNet(nn.Module):
    """A plain chain of layers run from :class:`Structure` ops (``lth compact`` builds the smaller network
    of a neuron/filter ticket with it): the params are named by the ops' layers, so they are the
    original model's layers with fewer units.

    ``ops``: the chain ops as sorted item tuples, every dense/conv op with ``features`` (its output
    units), and convs with ``kernel`` ``(kh, kw)``; ``bias``: whether the layer has one.
    """

    ops: tuple[tuple[tuple[str, Any], ...], ...]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for items in self.ops:
            op = dict(items)
            kind = op["op"]
            if kind == "flatten":
                x = x.reshape((x.shape[0], -1))
            elif kind == "pool":
                x = _max_pool(x)
            elif kind == "gap":
                x = jnp.mean(x, axis=(1, 2))
            elif kind == "dense":
                x = nn.Dense(op["features"], use_bias=op.get("bias", True), name=op["layer"])(x)
            elif kind == "conv":
                s = op.get("strides", 1)
                x = nn.Conv(op["features"], tuple(op["kernel"]), strides=(s, s), padding="SAME",
                            use_bias=op.get("bias", True), name=op["layer"], conv_general_dilated=loop_friendly_conv)(x)
            else:
                raise ValueError(f"unknown chain op {kind!r}")
            if kind in ("dense", "conv") and op.get("relu"):
                x = nn.relu(x)
        return x


# ---------------------------------------------------------------------------- builders

def _need_image(name: str, input_shape: tuple[int, ...], n_pools: int) -> None:
    """ValueError unless input_shape is [H, W, C] large enough for ``n_pools`` 2x2 max-pools."""
    if len(input_shape) != 3:
        raise ValueError(f"model {name} needs image inputs [H, W, C]; data set gives shape {input_shape}")
    h, w, _ = input_shape
    if min(h, w) < 2 ** n_pools:
        raise ValueError(f"model {name} halves the image {n_pools} times and needs H, W >= {2 ** n_pools}; "
                         f"data set gives shape {input_shape}")


def _scale_plan(plan: Sequence[int | str], width: float) -> tuple[int | str, ...]:
    return tuple(p if p == POOL else scale_width(p, width) for p in plan)


@register("mlp")
def mlp(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return MLP(tuple(scale_width(w, cfg.width) for w in cfg.widths), num_classes, cfg.init)


@register("lenet_300_100")
def lenet_300_100(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    # LeCun et al. 1998 / Frankle & Carbin 2019; cfg.widths is ignored.
    return MLP(tuple(scale_width(w, cfg.width) for w in (300, 100)), num_classes, cfg.init)


# Frankle & Carbin 2019, Figure 2.
_CONV_PLANS = {
    "conv2": (64, 64, POOL),
    "conv4": (64, 64, POOL, 128, 128, POOL),
    "conv6": (64, 64, POOL, 128, 128, POOL, 256, 256, POOL),
}


def _conv_builder(name: str) -> Builder:
    def build(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        plan = _CONV_PLANS[name]
        _need_image(name, input_shape, plan.count(POOL))
        fc = tuple(scale_width(w, cfg.width) for w in (256, 256))
        return ConvNet(_scale_plan(plan, cfg.width), fc, num_classes, cfg.init)

    build.__name__ = name
    return build


for _name in _CONV_PLANS:
    register(_name)(_conv_builder(_name))


# Simonyan & Zisserman 2015 configs A/D/E for CIFAR, as in open_lth (Frankle et al. 2020): the
# fifth max-pool is replaced by the global average pool, so 32x32 inputs end at 2x2 -> 1x1.
_VGG_PLANS = {
    "vgg11": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512),
    "vgg16": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512),
    "vgg19": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
              512, 512, 512, 512),
}


def _vgg_builder(name: str) -> Builder:
    def build(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        plan = _VGG_PLANS[name]
        _need_image(name, input_shape, plan.count(POOL))
        return VGG(_scale_plan(plan, cfg.width), num_classes, cfg.init)

    build.__name__ = name
    return build


for _name in _VGG_PLANS:
    register(_name)(_vgg_builder(_name))


@register("resnet20")
def resnet20(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    # He et al. 2016: 6n+2 layers with n = 3; stages of 16, 32, 64 channels.
    _need_image("resnet20", input_shape, 0)  # stride-2 SAME convs never reach size 0
    return ResNet(scale_width(16, cfg.width), tuple(scale_width(c, cfg.width) for c in (16, 32, 64)), 3,
                  num_classes, cfg.init)


@register("vit")
def vit(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    # Dosovitskiy et al. 2021, pre-LN. model.width w scales the residual width and the MLP hidden size
    # (vit_widths); the heads and their width (dim / heads) stay.
    _need_image("vit", input_shape, 0)
    h, w, _ = input_shape
    if h % cfg.patch or w % cfg.patch:
        raise ValueError(f"model.patch = {cfg.patch} does not divide the images of shape {tuple(input_shape)} "
                         f"(H and W must be multiples of it); use a divisor of {math.gcd(h, w)}")
    if cfg.dim % cfg.heads:
        raise ValueError(f"model.dim = {cfg.dim} is not a multiple of model.heads = {cfg.heads}; use a dim "
                         "that the head count divides")
    tokens = (h // cfg.patch) * (w // cfg.patch) + (cfg.pool == "cls")
    dim, hidden = vit_widths(cfg, tokens, cfg.patch ** 2 * input_shape[2], num_classes)
    return ViT(cfg.patch, dim, cfg.depth, cfg.heads, cfg.dim // cfg.heads, hidden, num_classes, cfg.pool, cfg.init)


def vit_widths(cfg: ModelConfig, tokens: int, patch_inputs: int, num_classes: int) -> tuple[int, int]:
    """(residual width, MLP hidden size) of the vit at ``cfg.width`` = w.

    The residual width is ``max(1, floor(w * dim))`` and the hidden size ``round(w * mlp_ratio * dim)``
    plus as many units as the parameters of the fractional part of ``w * dim`` are worth: one residual
    unit costs a few hundred parameters, so rounding it alone would move the count in steps of several
    percent, while one hidden unit costs ``depth * (2 * dim + 1)``. The count then grows in those small
    steps with w, and a small-dense baseline matches a ticket's count (:func:`lth.prune.baselines.match_width`).
    At w = 1: ``(dim, round(mlp_ratio * dim))``.
    """
    exact = cfg.width * cfg.dim
    dim = max(1, math.floor(exact + 1e-9))
    hidden = max(1, round(cfg.width * cfg.mlp_ratio * cfg.dim))
    inner = cfg.dim // cfg.heads * cfg.heads
    per_dim = cfg.depth * (4 * inner + 6 + 2 * hidden) + patch_inputs + tokens + 4 + num_classes
    extra = round(max(0.0, exact - dim) * per_dim / (cfg.depth * (2 * dim + 1)))
    return dim, hidden + extra


# ---------------------------------------------------------------------------- params pytrees

def path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def layer_key(path) -> str:
    """Module path of a params leaf: ``"dense_0"``, ``"stage1_block0/conv_0"``."""
    return "/".join(path_names(path)[:-1])


def layer_kind(path, leaf, structure: Structure | None = None) -> str:
    """What a params (or batch_stats) leaf is: "conv" | "dense" | "output" | "bias" | "norm" | "frozen".

    With a ``structure`` (:func:`structure_of` the model), what the model declares decides first:
    leaves of its ``frozen`` layers are "frozen", kernels of its ``output`` layers "output", kernels of
    its chain layers the chain op's kind. Otherwise the naming convention of this module (the leaf's
    module name: ``conv*``, ``dense*``, ``output``, ``bn*``) decides, so it also works on
    population-stacked ``[K, ...]`` trees, masks and scores; kernels of layers named otherwise fall
    back to their rank (>= 3: conv, else dense). ``path`` is a key path from
    :func:`jax.tree_util.tree_map_with_path`.
    """
    names = path_names(path)
    leaf_name = names[-1] if names else ""
    module = names[-2] if len(names) >= 2 else ""
    layer = "/".join(names[:-1])
    if structure is not None:
        if any(layer == f or layer.startswith(f + "/") for f in structure.frozen):
            return "frozen"
        if leaf_name == "kernel":
            if layer in structure.output:
                return "output"
            declared = {op["layer"]: op["op"] for op in structure.chain_layers()}.get(layer)
            if declared is not None:
                return declared
    if module.startswith("bn") or leaf_name in ("scale", "mean", "var"):
        return "norm"
    if leaf_name == "bias":
        return "bias"
    if leaf_name == "kernel":
        if module == OUTPUT and (structure is None or layer in structure.output):
            return "output"
        if module.startswith("conv"):
            return "conv"
        if module.startswith("dense"):
            return "dense"
        return "conv" if len(_shape(leaf)) >= 3 else "dense"
    raise ValueError(f"cannot classify parameter {'/'.join(names)!r}: expected a kernel, bias or "
                     "batch-norm leaf (a model declares other layers in Structure.frozen)")


def layer_kinds(params: PyTree, structure: Structure | None = None) -> PyTree:
    """:func:`layer_kind` of every leaf, as a pytree shaped like ``params``."""
    return jax.tree_util.tree_map_with_path(lambda p, x: layer_kind(p, x, structure), params)


def is_conv_kernel(path, leaf) -> bool:
    return layer_kind(path, leaf) == "conv"


def output_layer_name(params: PyTree) -> str:
    """Name of the classifier layer (always :data:`OUTPUT`); KeyError if params lack it."""
    if OUTPUT not in params:
        raise KeyError(f"params have no {OUTPUT!r} layer; top-level layers: {', '.join(params)}")
    return OUTPUT


def param_count(params: PyTree) -> int:
    """Total number of scalars in a pytree (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
    return sum(math.prod(_shape(x)) for x in jax.tree.leaves(params))


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


# ============================================================================ gpt
# ``gpt``: a decoder-only byte-level transformer (Radford et al. 2018, 2019).
#
# Tokens are bytes (vocabulary 256, the data set's ``num_classes``); ``x [B, T]`` (byte values, any
# numeric dtype) -> logits ``[B, T, 256]``, position t's logits predicting byte t + 1. Learned token and
# position embeddings, ``model.depth`` pre-LN blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with
# causal multi-head self-attention (Vaswani et al. 2017, Eq. 1, masked so position t attends to
# positions <= t) and a GELU MLP of ``mlp_ratio * dim`` hidden units, a final layer norm and the
# ``output`` head (or, with ``model.tie_embeddings``, the transposed token embedding).
#
# Every projection is a ``Dense`` layer (``block_i/attn/{q,k,v,out}``, ``block_i/mlp/{in,out}``), so
# masks, quantization and export see ordinary kernels; the embeddings, layer norms and the head are
# declared frozen (:class:`lth.models.Structure`): by default only attention and MLP weights are pruned.
# The blocks are :class:`lth.transformer.Block` (the vit's) with the gpt's own layer names (``ln_1``,
# ``ln_2``, ``mlp/{in, out}``), so runs stored before the two shared their blocks load unchanged.
# The width multiplier scales the head dimension (``dim / heads``), so ``dim`` stays a multiple of ``heads``.


GPT_NORMS = ("ln_1", "ln_2")  # the gpt's names of a block's layer norms and MLP layers
GPT_MLP = ("in", "out")


class GPT(nn.Module):
    """Decoder-only byte-level transformer: ``x [B, T]`` -> logits ``[B, T, vocab]`` (module doc)."""

    vocab: int
    context: int
    depth: int
    dim: int
    heads: int
    hidden: int
    tie_embeddings: bool = False
    init_scheme: str = "glorot_normal"
    block_shapes: tuple[tuple[int, int], ...] = ()  # per block (heads, hidden) after compaction; () = uniform

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        tokens = x.astype(jnp.int32)
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"gpt: a window of {t} tokens is longer than model.context = {self.context}")
        embed = nn.Embed(self.vocab, self.dim, embedding_init=nn.initializers.normal(0.02), name="embed")
        pos = nn.Embed(self.context, self.dim, embedding_init=nn.initializers.normal(0.02), name="pos_embed")
        h = embed(tokens) + pos(jnp.arange(t))[None]
        for i, (heads, hidden) in enumerate(block_shapes(self)):
            h = tf.Block(heads, self.dim // self.heads, hidden, self.init_scheme, causal=True, norms=GPT_NORMS,
                         mlp_names=GPT_MLP, name=f"block_{i}")(h)
        h = nn.LayerNorm(name="ln_f")(h)
        if self.tie_embeddings:
            return embed.attend(h)
        return _dense(self.vocab, self.init_scheme, OUTPUT)(h)

    def structure(self) -> Structure:
        """Not a chain; the embeddings, every layer norm and the head are frozen (never pruned nor quantized);
        the attention (kind ``attn``, whole heads) and MLP (kind ``mlp``, hidden units) layers are pruned."""
        blocks = [f"block_{i}" for i in range(self.depth)]
        norms = tuple(f"{blk}/{n}" for blk in blocks for n in GPT_NORMS)
        head = () if self.tie_embeddings else (OUTPUT,)
        kinds = tuple((f"{blk}/attn", "attn") for blk in blocks) + tuple((f"{blk}/mlp", "mlp") for blk in blocks)
        return Structure(output=head, frozen=("embed", "pos_embed", *norms, "ln_f", *head), kinds=kinds,
                         heads=tuple((f"{blk}/attn", h) for blk, (h, _) in zip(blocks, block_shapes(self))),
                         mlps=tuple((f"{blk}/mlp/{GPT_MLP[0]}", f"{blk}/mlp/{GPT_MLP[1]}") for blk in blocks))

    compacted = compacted_blocks  # lth compact: fewer heads and hidden units per block


@register("gpt")
def gpt(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """The byte-level GPT of ``cfg`` for windows ``input_shape = (T,)``; ``num_classes`` is the vocabulary."""
    if len(input_shape) != 1:
        raise ValueError(f"model gpt needs token windows [T] (data.name = 'text' or 'pystdlib'); the data set "
                         f"gives inputs of shape {input_shape}")
    context = cfg.context or input_shape[0]
    if input_shape[0] > context:
        raise ValueError(f"model.context = {cfg.context} is shorter than the data's windows (data.context = "
                         f"{input_shape[0]}); raise model.context or set it to 0 (the data's window)")
    if cfg.dim % cfg.heads:
        raise ValueError(f"model.dim = {cfg.dim} is not a multiple of model.heads = {cfg.heads}; "
                         "choose dim = heads * head size")
    head_dim = scale_width(cfg.dim // cfg.heads, cfg.width)
    dim = head_dim * cfg.heads
    return GPT(vocab=num_classes, context=context, depth=cfg.depth, dim=dim, heads=cfg.heads,
               hidden=scale_width(round(cfg.mlp_ratio * cfg.dim), cfg.width), tie_embeddings=cfg.tie_embeddings,
               init_scheme=cfg.init)

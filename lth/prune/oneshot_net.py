"""One-shot pruning of a whole trained network, layer after layer in forward order (Wanda, Sun et al.
2024; SparseGPT, Frantar & Alistarh 2023; and plain magnitude as their baseline).

Each prunable ``nn.Dense`` kernel ``[in, out]`` is pruned as ``w = kernel.T`` ``[out, in]`` (a conv
kernel ``[kh, kw, cin, out]`` as ``[out, kh*kw*cin]`` with im2col inputs) by the
layer-level functions of :mod:`lth.prune.oneshot`, from its calibration inputs ``x [N, in]``: the
inputs it receives on the calibration batches *in the network whose earlier layers are already
pruned* (as both papers do). Inputs are read with ``flax.linen.intercept_methods`` (no model edit). A conv's
rows (one per image and output position) are kept as ``R [in, in]`` with ``R^T R = X^T X``
(:func:`gram_root`): SparseGPT needs only ``X^T X`` and Wanda only its diagonal (the column norms).

Batched: a population of K networks (members: several seeds and methods) is pruned together; one
compiled forward pass captures every layer's inputs of all K members (run once per layer, so the
layers before are the pruned ones), and each layer function is compiled once per (method, shape,
density) and vmapped over the members that share them: no compile per member.

Targets are per layer: ``density`` (fraction of the kernel kept) or ``nm = (k, m)`` (keep k of every
m consecutive inputs of an output, :mod:`lth.prune.nm`'s groups). Wanda keeps per output row (its
count is ``out * round(density * in)``, as published); SparseGPT and magnitude keep exactly
``round(density * size)`` in the layer.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .oneshot import keep_nm, sparsegpt, wanda

PyTree = Any
METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")


def _apply(model, params, batch_stats, x):
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    return model.apply(variables, x, train=False)


def _pairs(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_patches(m: nn.Conv, a: jax.Array) -> jax.Array | None:
    """im2col rows ``[N * positions, kh * kw * cin]`` of an ``nn.Conv`` call on ``a [N, H, W, cin]``, in the
    order of its kernel flattened ``[kh * kw * cin, out]``; None for a conv this cannot unfold (grouped,
    circular padding, not 2-D)."""
    ks = tuple(m.kernel_size)
    if len(ks) != 2 or a.ndim != 4 or m.feature_group_count != 1:
        return None
    pad = m.padding
    if isinstance(pad, str):
        if pad.upper() not in ("SAME", "VALID"):
            return None
        pad = pad.upper()
    elif isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    else:
        pad = tuple(_pairs(p, 2) for p in pad)
    patches = jax.lax.conv_general_dilated_patches(
        a, ks, _pairs(m.strides or 1, 2), pad, lhs_dilation=_pairs(m.input_dilation or 1, 2),
        rhs_dilation=_pairs(m.kernel_dilation or 1, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    cin = a.shape[-1]  # the patches' features are (cin, kh, kw); the kernel's rows (kh, kw, cin)
    patches = patches.reshape(*patches.shape[:3], cin, *ks)
    return jnp.moveaxis(patches, 3, 5).reshape(-1, ks[0] * ks[1] * cin)


def gram_root(x: jax.Array) -> jax.Array:
    """``R [in, in]`` with ``R^T R = X^T X`` for ``x [N, in]``: the same Hessian (SparseGPT) and column
    norms (Wanda) as the N rows, for layers whose rows (a conv's positions) are too many to keep."""
    lam, v = jnp.linalg.eigh(x.T @ x)
    return jnp.sqrt(jnp.maximum(lam, 0.0))[:, None] * v.T


def dense_inputs(model, params, batch_stats, x, unfold: bool = True) -> dict[tuple, jax.Array]:
    """Inputs ``[N, in]`` of every ``nn.Dense`` call of one forward pass (eval mode) on ``x``, keyed
    by the path of its kernel in ``params`` (e.g. ``('dense_0', 'kernel')``), in call order; and of
    every ``nn.Conv`` its im2col rows as :func:`gram_root` ``[kh*kw*cin, kh*kw*cin]`` (``unfold``)."""
    found: dict[tuple, jax.Array] = {}

    def hook(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.Dense) and context.method_name == "__call__":
            a = args[0]
            found[tuple(m.path) + ("kernel",)] = a.reshape(-1, a.shape[-1])
        elif unfold and isinstance(m, nn.Conv) and context.method_name == "__call__":
            rows = conv_patches(m, args[0])
            if rows is not None:
                found[tuple(m.path) + ("kernel",)] = gram_root(rows.astype(jnp.float32))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(hook):
        _apply(model, params, batch_stats, x)
    return found


def dense_kernel_paths(model, params, batch_stats, x) -> list[tuple]:
    """Paths of the Dense and (unfoldable) Conv kernels in forward order (shapes only: nothing runs)."""
    out = jax.eval_shape(lambda p, b, x: dense_inputs(model, p, b, x), params, batch_stats, x)
    return list(out)


def unsupported_layers(model, params, batch_stats, x, can_prune) -> list[str]:
    """Prunable kernels (ndim >= 2) that are neither ``nn.Dense`` nor unfoldable ``nn.Conv`` kernels
    (embeddings, grouped convs, ...): the calibrated methods do not handle them yet."""
    dense = set(dense_kernel_paths(model, params, batch_stats, x))
    flat_p = traverse_util.flatten_dict(params)
    flat_c = traverse_util.flatten_dict(can_prune)
    return ["/".join(map(str, k)) for k, v in flat_p.items() if flat_c[k] and len(v.shape) >= 2 and k not in dense]


@functools.lru_cache(maxsize=8)
def _capture_fn(model):
    """One program (compiled once per population shape; flax modules compare by value): all layers'
    inputs ``[K, N, in]`` of K members."""
    return jax.jit(jax.vmap(lambda p, b, x: dense_inputs(model, p, b, x)))


@functools.lru_cache(maxsize=None)
def _layer_fn(method: str, density: float | None, nm: tuple[int, int] | None):
    """``(w [K, out, in], x [K, N, in]) -> (w_new, mask)``, compiled once per (method, target, shape)."""
    if method == "wanda":
        one = functools.partial(wanda, density=density, nm=nm)
    elif method == "sparsegpt":
        one = functools.partial(sparsegpt, density=density, nm=nm)
    else:
        raise ValueError(f"unknown calibrated one-shot method {method!r}; allowed: {', '.join(CALIBRATED)}")
    return jax.jit(jax.vmap(one))


def as_matrix(kernel) -> np.ndarray:
    """The papers' ``W [out, in]`` of a Dense ``[in, out]`` or conv ``[kh, kw, cin, out]`` kernel
    (``in = kh * kw * cin`` in the im2col order)."""
    kernel = np.asarray(kernel)
    return kernel.reshape(-1, kernel.shape[-1]).T


def unmatrix(w, shape) -> np.ndarray:
    """Inverse of :func:`as_matrix`: ``[out, in]`` back to the kernel's ``shape``."""
    return np.asarray(w).T.reshape(shape)


def magnitude_layer(w: np.ndarray, density: float | None, nm: tuple[int, int] | None) -> np.ndarray:
    """Keep mask of ``w [out, in]`` by ``|w|``: the ``round(density * size)`` largest in the layer
    (ties: the lower flat index), or the k largest of every m consecutive inputs of a row."""
    if nm is not None:
        return np.asarray(keep_nm(jnp.abs(jnp.asarray(w)), *nm)) > 0
    k = int(round(density * w.size))
    order = np.argsort(-np.abs(w).reshape(-1), kind="stable")
    keep = np.zeros(w.size, bool)
    keep[order[:k]] = True
    return keep.reshape(w.shape)


def prune_population(model, methods: Sequence[str], params: Sequence[PyTree], batch_stats: Sequence[PyTree],
                     xs: Sequence[np.ndarray] | None, targets: Sequence[dict]) -> tuple[list[PyTree], list[PyTree]]:
    """Prune K trained networks one-shot, layer after layer.

    Args:
      model: the flax model (every member has its structure).
      methods: per member, one of :data:`METHODS`.
      params, batch_stats: per member, the trained dense weights (numpy trees).
      xs: per member its calibration examples ``[N, ...]`` (None when every method is magnitude).
      targets: per member, ``{kernel path: density (float) or (k, m)}`` for each kernel to prune;
        kernels not named keep all their weights.

    Returns:
      ``(params, masks)`` per member: the pruned weights (exactly 0 where pruned; SparseGPT's kept
      weights reconstructed) and bool masks with the params' structure (all True outside the targets).
    """
    K = len(methods)
    flat = [dict(traverse_util.flatten_dict(jax.tree.map(np.asarray, p))) for p in params]
    masks = [{k: np.ones(np.shape(v), bool) for k, v in f.items()} for f in flat]
    calibrated = [i for i in range(K) if methods[i] in CALIBRATED]
    order = list(targets[0]) if K else []
    if calibrated:
        order = dense_kernel_paths(model, params[calibrated[0]], batch_stats[calibrated[0]], xs[calibrated[0]][:1])
        missing = {p for t in targets for p in t} - set(order)
        if missing:
            raise ValueError(f"one-shot pruning with calibration handles Dense and plain 2-D Conv layers only; not "
                             f"supported for {', '.join(sorted('/'.join(map(str, p)) for p in missing))}")
        bs_pop = jax.tree.map(lambda *a: np.stack(a), *[batch_stats[i] for i in calibrated]) \
            if jax.tree.leaves(batch_stats[calibrated[0]]) else {}
        x_pop = np.stack([np.asarray(xs[i]) for i in calibrated])
        capture = _capture_fn(model)
    for path in order:
        todo = [i for i in range(K) if path in targets[i]]
        if not todo:
            continue
        cal = [i for i in todo if methods[i] in CALIBRATED]
        if cal:  # this layer's inputs in the networks pruned up to here (all calibrated members, one program)
            p_pop = jax.tree.map(lambda *a: np.stack(a), *[traverse_util.unflatten_dict(flat[i]) for i in calibrated])
            ins = np.asarray(capture(p_pop, bs_pop, x_pop)[path])
        groups: dict[tuple, list[int]] = {}
        for i in todo:
            t = targets[i][path]
            key = (methods[i], tuple(t) if isinstance(t, (tuple, list)) else float(t))
            groups.setdefault(key, []).append(i)
        for (method, t), members in groups.items():
            density, nm = (None, t) if isinstance(t, tuple) else (t, None)
            if nm is None and density >= 1.0:
                continue
            if method == "magnitude":
                for i in members:
                    keep = unmatrix(magnitude_layer(as_matrix(flat[i][path]), density, nm), flat[i][path].shape)
                    flat[i][path] = flat[i][path] * keep
                    masks[i][path] = keep
                continue
            w = np.stack([as_matrix(flat[i][path]) for i in members])
            x = ins[[calibrated.index(i) for i in members]]
            w_new, mask = _layer_fn(method, density, nm)(w, x)
            w_new, mask = np.asarray(w_new), np.asarray(mask) > 0
            for j, i in enumerate(members):
                shape = flat[i][path].shape
                masks[i][path] = unmatrix(mask[j], shape)
                flat[i][path] = np.where(masks[i][path], unmatrix(w_new[j], shape), 0.0).astype(flat[i][path].dtype)
    return ([traverse_util.unflatten_dict(f) for f in flat], [traverse_util.unflatten_dict(m) for m in masks])


__all__ = ["METHODS", "CALIBRATED", "dense_inputs", "dense_kernel_paths", "unsupported_layers", "magnitude_layer",
           "prune_population"]

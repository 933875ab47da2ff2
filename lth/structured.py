"""Structured pruning of sequential networks (mlp, lenet_300_100, conv2/4/6): whole neurons / filters.

Removing hidden unit (or filter) c of layer l zeroes column c of l's kernel, entry c of its bias and
the inputs of layer l+1 that read unit c (rows c of a dense kernel, input channel c of a conv, or
every flattened position of channel c for the first dense layer after the convolutions). Units are
ranked by the L1 or L2 norm of their surviving incoming weights (Li et al. 2017 for filters).

:func:`compact` turns such a mask into a physically smaller dense network whose outputs equal the
masked network's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .config import ModelConfig, PruneConfig
from .models import POOL, ConvNet, MLP, build_model

PyTree = Any
SEQUENTIAL = ("mlp", "lenet_300_100", "conv2", "conv4", "conv6")


def layer_order(params: PyTree) -> list[str]:
    """Weight layers in forward order: conv_*, dense_*, output."""
    def key(name):
        kind, _, idx = name.partition("_")
        return ({"conv": 0, "dense": 1}.get(kind, 2), int(idx) if idx.isdigit() else 0)
    return sorted(params, key=key)


def unit_scores(kernel: np.ndarray, mask: np.ndarray, norm: str) -> np.ndarray:
    """Norm of each output unit's surviving incoming weights: ``[out]``."""
    w = np.abs(np.where(mask, kernel, 0.0)).reshape(-1, kernel.shape[-1])
    return w.sum(0) if norm == "l1" else np.sqrt((w ** 2).sum(0))


def alive_units(mask: PyTree, layer: str) -> np.ndarray:
    k = np.asarray(mask[layer]["kernel"])
    return k.reshape(-1, k.shape[-1]).any(0)


def structured_prune(params: PyTree, mask: PyTree, cfg: PruneConfig, model_name: str) -> PyTree:
    """Prune ``rate`` (``conv_rate`` for convs) of the surviving units of every hidden layer."""
    if model_name not in SEQUENTIAL:
        raise ValueError(f"prune.granularity = {cfg.granularity!r} supports {', '.join(SEQUENTIAL)}; "
                         f"not {model_name}")
    new = {name: {leaf: np.array(v, bool) for leaf, v in layer.items()} for name, layer in mask.items()}
    order = layer_order(params)
    kind = "conv" if cfg.granularity == "filter" else "dense"  # filters: conv layers; neurons: fc layers
    for i, name in enumerate(order[:-1]):  # the output layer keeps all its classes
        if name in cfg.exclude or not name.startswith(kind):
            continue
        conv = name.startswith("conv")
        rate = (cfg.conv_rate if cfg.conv_rate is not None else cfg.rate) if conv else cfg.rate
        if cfg.rates and name in cfg.rates:
            rate = cfg.rates[name]
        alive = alive_units(new, name)
        n_drop = int(math.floor(rate * alive.sum() + 0.5))
        if n_drop == 0:
            continue
        scores = np.where(alive, unit_scores(np.asarray(params[name]["kernel"]), new[name]["kernel"], cfg.structure_norm),
                          np.inf)
        drop = np.argsort(scores, kind="stable")[:n_drop]
        remove_units(new, order, i, drop)
    return new


def remove_units(mask: dict, order: list[str], i: int, units: np.ndarray) -> None:
    """Zero units of layer order[i] and every input of order[i + 1] that reads them (in place)."""
    name, nxt = order[i], order[i + 1]
    mask[name]["kernel"][..., units] = False
    if "bias" in mask[name]:
        mask[name]["bias"][units] = False
    k = mask[nxt]["kernel"]
    if k.ndim == 4:  # conv -> conv: input channel axis
        k[:, :, units, :] = False
    elif name.startswith("conv"):  # conv -> flatten -> dense: rows are (h, w, c) flattened
        channels = mask[name]["kernel"].shape[-1]
        rows = np.arange(k.shape[0])
        k[np.isin(rows % channels, units), :] = False
    else:
        k[units, :] = False


def is_structured(mask: PyTree, order: list[str]) -> bool:
    """The kernel masks are products alive_inputs x alive_units: whole units, gone with their outputs."""
    prev, prev_name = None, None
    for name in order:
        k = np.asarray(mask[name]["kernel"], bool)
        alive = k.reshape(-1, k.shape[-1]).any(0) if name != order[-1] else np.ones(k.shape[-1], bool)
        rows = np.ones(k.shape[:-1], bool)
        if prev is not None:
            if k.ndim == 4:
                rows = np.broadcast_to(prev, k.shape[:-1])
            elif prev_name.startswith("conv"):
                rows = prev[np.arange(k.shape[0]) % len(prev)]
            else:
                rows = prev
        if not np.array_equal(k, rows[..., None] & alive):
            return False
        prev, prev_name = alive, name
    return True


def compact(params: PyTree, mask: PyTree, cfg: ModelConfig, num_classes: int, input_shape):
    """(module, params) of the physically smaller network computing the same function as the masked one."""
    order = layer_order(params)
    keep = {name: alive_units(mask, name) for name in order[:-1]}
    small: dict = {}
    prev_keep, prev_name = None, None
    for name in order:
        w = np.where(mask[name]["kernel"], params[name]["kernel"], 0.0)
        b = np.where(mask[name]["bias"], params[name]["bias"], 0.0) if "bias" in params[name] else None
        if prev_keep is not None:
            if w.ndim == 4:
                w = w[:, :, prev_keep, :]
            elif prev_name.startswith("conv"):
                rows = np.arange(w.shape[0]) % len(prev_keep)
                w = w[prev_keep[rows], :]
            else:
                w = w[prev_keep, :]
        if name in keep:
            w = w[..., keep[name]]
            b = b[keep[name]] if b is not None else None
        small[name] = {"kernel": w.astype(np.float32)}
        if b is not None:
            small[name]["bias"] = b.astype(np.float32)
        prev_keep, prev_name = keep.get(name), name
    widths = {name: int(k.sum()) for name, k in keep.items()}
    if cfg.name in ("mlp", "lenet_300_100"):
        module = MLP(tuple(widths[f"dense_{i}"] for i in range(len(widths))), num_classes, cfg.init)
    else:
        base = build_model(cfg, num_classes, input_shape)
        plan, j = [], 0
        for item in base.plan:
            if item == POOL:
                plan.append(POOL)
            else:
                plan.append(widths[f"conv_{j}"])
                j += 1
        fc = tuple(widths[f"dense_{i}"] for i in range(len(base.fc)))
        module = ConvNet(tuple(plan), fc, num_classes, cfg.init)
    if any(v == 0 for v in widths.values()):
        raise ValueError(f"a layer lost every unit ({widths}); the compact network would be empty")
    return module, small


def compact_run(run_dir, level: int, member: int = 0, batch: int = 1000, repeats: int = 20) -> dict:
    """Compact a stored structurally pruned member; check outputs, time masked vs compact inference."""
    import time
    from pathlib import Path

    import jax

    from .sensitivity import open_level
    from .store import load_tree
    from .train import apply_mask, unstack

    run_dir = Path(run_dir)
    cfg, store, data, model = open_level(run_dir, level)
    params = unstack(load_tree(store.level_dir(level) / "final.msgpack")["params"], member)
    mask = unstack(load_tree(store.level_dir(level) / "masks.msgpack"), member)
    if not is_structured(mask, layer_order(params)):
        raise ValueError(f"level {level} of {run_dir} is not structurally pruned (prune.granularity = "
                         f"{cfg.prune.granularity!r}); nothing to compact")
    small_model, small_params = compact(params, mask, cfg.model, data.num_classes, data.input_shape)
    x = jax.numpy.asarray(data.x_test[:batch])
    big_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    small_fn = jax.jit(lambda p, x: small_model.apply({"params": p}, x))
    masked = apply_mask(params, mask)

    def best_time(fn, p):
        fn(p, x).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(p, x).block_until_ready()
            times.append(time.perf_counter() - t0)
        return min(times)

    diff = float(np.max(np.abs(np.asarray(big_fn(masked, x)) - np.asarray(small_fn(small_params, x)))))
    n_big = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    n_small = sum(int(np.size(v)) for v in jax.tree.leaves(small_params))
    return {"level": level, "params_masked": n_big, "params_nonzero": int(sum(np.sum(m) for m in jax.tree.leaves(mask))),
            "params_compact": n_small, "max_abs_diff": diff, "batch": int(x.shape[0]),
            "latency_masked_ms": 1e3 * best_time(big_fn, masked),
            "latency_compact_ms": 1e3 * best_time(small_fn, small_params)}

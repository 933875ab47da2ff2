"""Structured pruning: whole neurons / filters of sequential networks, whole residual blocks of ResNets.

**Neurons and filters** (mlp, lenet_300_100, conv2/4/6; filters also vgg11/16/19). Removing hidden
unit (or filter) c of layer l zeroes column c of l's kernel, entry c of its bias, entry c of the
scale and bias of its batch norm ``bn_l`` (VGG) and the inputs of layer l+1 that read unit c (rows c
of a dense kernel, input channel c of a conv, or every flattened position of channel c for the first
dense layer after the convolutions). Units are ranked by the L1 or L2 norm of their surviving
incoming weights (Li et al. 2017 for filters).

**Layers** (resnet20). Dropping a residual block ``stage{s}_block{b}`` masks every parameter of its
residual branch: both conv kernels and both batch norms' scale and bias. The branch then outputs
exactly 0 in train and eval mode whatever the running statistics (BN computes
``(x - mean) * scale / sqrt(var + eps) + bias``), so the block computes ``relu(x + 0) = x`` (its input
is already post-ReLU): the network is the one with the block removed. Only blocks with an identity
shortcut can be dropped; the first block of a stage whose 1x1 ``conv_shortcut`` projection changes
stride and channels is always kept. Each level drops ``round_half_up(prune.rate * n)`` of the n
surviving droppable blocks (so a level may drop none once n is small), those whose branch's last
batch-norm scale is smallest (``prune.structure_norm``: mean |gamma| for l1, root-mean-square for
l2; :func:`block_score`).

:func:`compact` turns a neuron/filter mask of mlp, lenet_300_100 or conv2/4/6 into a physically
smaller dense network whose outputs equal the masked network's.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..config import STRUCTURED_MODELS, ConfigError, ModelConfig, PruneConfig
from ..models import POOL, ConvNet, MLP, build_model
from ..store import load_tree
from ..stored import StoredRun
from ..train import apply_mask, unstack
from .nm import nm_prune

PyTree = Any
SEQUENTIAL = ("mlp", "lenet_300_100", "conv2", "conv4", "conv6")  # the models compact supports
BLOCK = re.compile(r"stage(\d+)_block(\d+)")  # residual block submodules of lth.models.ResNet


def layer_order(params: PyTree) -> list[str]:
    """Weight layers (those with a kernel) in forward order: conv_*, dense_*, output; batch norms skipped."""
    def key(name):
        kind, _, idx = name.partition("_")
        return ({"conv": 0, "dense": 1}.get(kind, 2), int(idx) if idx.isdigit() else 0)
    return sorted((n for n in params if "kernel" in params[n]), key=key)


def norm_of(layer: str) -> str:
    """The batch norm that follows conv layer ``conv_i`` (VGG): ``bn_i``."""
    return "bn_" + layer.partition("_")[2]


def unit_scores(kernel: np.ndarray, mask: np.ndarray, norm: str) -> np.ndarray:
    """Norm of each output unit's surviving incoming weights: ``[out]``."""
    w = np.abs(np.where(mask, kernel, 0.0)).reshape(-1, kernel.shape[-1])
    return w.sum(0) if norm == "l1" else np.sqrt((w ** 2).sum(0))


def alive_units(mask: PyTree, layer: str) -> np.ndarray:
    k = np.asarray(mask[layer]["kernel"])
    return k.reshape(-1, k.shape[-1]).any(0)


def _copy(mask: PyTree) -> PyTree:
    return {k: _copy(v) if isinstance(v, Mapping) else np.array(v, bool) for k, v in mask.items()}


def structured_prune(params: PyTree, mask: PyTree, cfg: PruneConfig, model_name: str) -> PyTree:
    """Next mask of one member: ``cfg.granularity`` "neuron"/"filter" prunes ``rate`` (``conv_rate`` for
    convs) of the surviving units of every hidden layer; "layer" drops residual blocks
    (:func:`block_prune`); "n:m" moves every group one step towards N:M (:func:`lth.nm.nm_prune`). ValueError for a model the granularity does not support."""
    supported = STRUCTURED_MODELS.get(cfg.granularity, ())
    if model_name not in supported:
        raise ValueError(f"prune.granularity = {cfg.granularity!r} supports {', '.join(supported) or 'no model'}; "
                         f"not {model_name}")
    if cfg.granularity == "layer":
        return block_prune(params, mask, cfg)
    if cfg.granularity == "n:m":
        return nm_prune(params, mask, cfg)
    new = _copy(mask)
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
    if name.startswith("conv") and norm_of(name) in mask:  # conv-BN-ReLU (VGG): the channel's BN shift too
        for leaf in mask[norm_of(name)].values():
            leaf[units] = False
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
        if name.startswith("conv") and norm_of(name) in mask:
            if not all(np.array_equal(np.asarray(v, bool), alive) for v in mask[norm_of(name)].values()):
                return False
        prev, prev_name = alive, name
    return True


# ---------------------------------------------------------------------------- residual blocks

def residual_blocks(params: PyTree) -> list[str]:
    """Names of the residual blocks ``stage{s}_block{b}`` in forward order."""
    names = [n for n in params if BLOCK.fullmatch(n)]
    return sorted(names, key=lambda n: tuple(int(g) for g in BLOCK.fullmatch(n).groups()))


def droppable_blocks(params: PyTree) -> list[str]:
    """Blocks with an identity shortcut (no ``conv_shortcut`` projection): the ones that can be dropped."""
    return [n for n in residual_blocks(params) if "conv_shortcut" not in params[n]]


def _branch_kernels(block: dict) -> list[str]:
    return sorted(k for k in block if k.startswith("conv") and k != "conv_shortcut")


def block_score(block: dict, block_mask: dict, norm: str) -> float:
    """How much a block's residual branch contributes: the norm of the scale of its last batch norm
    (the factor the branch's output is multiplied by; Liu et al. 2017, Huang & Wang 2018) over its
    surviving entries, mean |gamma| (l1) or RMS (l2). The conv weights before a batch norm do not
    set the branch's size (the norm divides it out) and shrink with width at init, so they would
    rank wide blocks first. A branch without batch norm falls back to its convs' per-weight norm."""
    bns = sorted(k for k in block if k.startswith("bn"))
    if bns:
        w = np.asarray(block[bns[-1]]["scale"], np.float64)
        keep = np.asarray(block_mask[bns[-1]]["scale"], bool)
    else:
        convs = _branch_kernels(block)
        w = np.concatenate([np.asarray(block[k]["kernel"], np.float64).ravel() for k in convs])
        keep = np.concatenate([np.asarray(block_mask[k]["kernel"], bool).ravel() for k in convs])
    n = int(keep.sum())
    if n == 0:
        return math.inf
    w = w[keep]
    return float(np.abs(w).sum() / n) if norm == "l1" else float(np.sqrt((w ** 2).sum() / n))


def block_alive(mask: PyTree, name: str) -> bool:
    """Whether block ``name`` still has a surviving residual-branch weight."""
    return any(np.any(mask[name][k]["kernel"]) for k in _branch_kernels(mask[name]))


def dropped_blocks(mask: PyTree) -> list[str]:
    """Blocks whose every mask entry is False."""
    return [n for n in residual_blocks(mask) if not any(np.any(m) for m in jax.tree.leaves(mask[n]))]


def drop_block(mask: dict, name: str) -> None:
    """Mask every parameter of block ``name``'s residual branch (in place); identity-shortcut blocks only."""
    if "conv_shortcut" in mask[name]:
        raise ValueError(f"{name} has a projection shortcut; only identity-shortcut blocks can be dropped")
    for leaf in jax.tree.leaves(mask[name]):
        leaf[...] = False


def block_prune(params: PyTree, mask: PyTree, cfg: PruneConfig) -> PyTree:
    """Drop ``round_half_up(cfg.rate * n)`` of the n surviving droppable blocks, lowest :func:`block_score`
    first (ties: the earlier block); blocks named in ``cfg.exclude`` are kept. Returns a new mask."""
    new = _copy(mask)
    alive = [n for n in droppable_blocks(params) if n not in cfg.exclude and block_alive(new, n)]
    n_drop = int(math.floor(cfg.rate * len(alive) + 0.5))
    scores = [block_score(params[n], new[n], cfg.structure_norm) for n in alive]
    for j in np.argsort(scores, kind="stable")[:n_drop]:
        drop_block(new, alive[j])
    return new


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
    run_dir = Path(run_dir)
    run = StoredRun.open(run_dir)
    run.check_level(level)
    cfg, store, data, model = run.cfg, run.store, run.data, run.model
    if cfg.model.name not in SEQUENTIAL:
        raise ConfigError(f"compact supports models {', '.join(SEQUENTIAL)}; {run_dir} is a {cfg.model.name} "
                          f"(prune.granularity = {cfg.prune.granularity!r}), whose pruned network stays masked")
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

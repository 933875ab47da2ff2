"""Structured pruning: whole neurons / filters of layer chains, whole residual blocks.

What a model allows is declared by the model (:class:`lth.models.Structure`): its layer chain (mlp,
lenet_300_100, conv2/4/6, vgg11/16/19 among the built-ins) and its droppable residual blocks
(resnet20). :func:`check_granularity` says, before any training, whether ``prune.granularity`` fits.

**Neurons and filters** (models with a chain; neurons need a hidden dense layer). Removing hidden
unit (or filter) c of layer l zeroes column c of l's kernel, entry c of its bias, entry c of the
scale and bias of its batch norm ``bn_l`` (VGG) and the inputs of layer l+1 that read unit c (rows c
of a dense kernel, input channel c of a conv, or every flattened position of channel c for the first
dense layer after the convolutions). Units are ranked by the L1 or L2 norm of their surviving
incoming weights (Li et al. 2017 for filters).

**Layers** (models declaring blocks, e.g. resnet20). Dropping a residual block ``stage{s}_block{b}``
masks every parameter of its residual branch: both conv kernels and both batch norms' scale and
bias. The branch then outputs
exactly 0 in train and eval mode whatever the running statistics (BN computes
``(x - mean) * scale / sqrt(var + eps) + bias``), so the block computes ``relu(x + 0) = x`` (its input
is already post-ReLU): the network is the one with the block removed. Only blocks with an identity
shortcut can be dropped; the first block of a stage whose 1x1 ``conv_shortcut`` projection changes
stride and channels is always kept. Each level drops ``round_half_up(prune.rate * n)`` of the n
surviving droppable blocks (so a level may drop none once n is small), those whose branch's last
batch-norm scale is smallest (``prune.structure_norm``: mean |gamma| for l1, root-mean-square for
l2; :func:`block_score`).

:func:`compact` turns a neuron/filter mask of a chain without batch norm or average pooling (mlp,
lenet_300_100, conv2/4/6, a user chain) into a physically smaller dense network
(:class:`lth.models.ChainNet`) whose outputs equal the masked network's; :func:`compact_run` compacts a
transformer's removed heads and hidden units with :mod:`lth.prune.compact_blocks`.
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

from ..config import ConfigError, ModelConfig, PruneConfig
from ..models import ChainNet, Structure, build_model, structure_of
from ..store import load_tree
from ..stored import StoredRun
from ..train import apply_mask, unstack
from .nm import grouped_fan_ins, nm_prune
from .compact_blocks import compact_blocks, compactable
from .heads import check_heads, head_prune
from .units import check_mlps, mlp_prune, mlp_rate

PyTree = Any
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


def granularities(structure: Structure) -> list[str]:
    """The ``prune.granularity`` values a model with this structure supports."""
    out = ["weight"]
    if structure.chain is not None:
        hidden = structure.chain_layers()[:-1]
        if any(op["op"] == "dense" for op in hidden) or structure.mlps:
            out.append("neuron")
        if any(op["op"] == "conv" for op in hidden):
            out.append("filter")
    elif structure.mlps:  # the MLPs inside transformer blocks
        out.append("neuron")
    if structure.blocks:
        out.append("layer")
    if structure.heads:
        out.append("head")
    return out + ["n:m"]


def check_granularity(cfg: PruneConfig, model, params: PyTree, model_name: str) -> None:
    """ConfigError unless ``cfg.granularity`` fits what ``model`` declares (its :class:`Structure`) and
    the declaration fits ``params`` (every chain layer exists and every kernel is in the chain; every
    block exists). Run before any level trains."""
    st = model if isinstance(model, Structure) else structure_of(model)
    g = cfg.granularity
    if g == "weight":
        return
    if g == "n:m":
        _check_nm_prunes(cfg, params, st, model_name)
        return
    fits = granularities(st)
    if g not in fits:
        why = ("it declares no droppable residual blocks (Structure.blocks)" if g == "layer" else
               "it declares no multi-head attention (Structure.heads)" if g == "head" else
               "it declares no plain chain of layers (Structure.chain)" if st.chain is None else
               "it has no hidden dense layer" if g == "neuron" else "it has no convolution")
        raise ConfigError(f"prune.granularity = {g!r} is not allowed with model.name = {model_name!r} ({why}); "
                          f"with {model_name} use prune.granularity = {', '.join(map(repr, fits))}")
    try:
        if g == "layer":
            block_names(st, params)
        elif g == "head":
            check_heads(params, st)
        elif g == "neuron" and st.mlps:
            check_mlps(params, st)
            if st.chain is not None:
                chain_order(st, params)
        else:
            chain_order(st, params)
    except ValueError as e:
        raise ConfigError(f"prune.granularity = {g!r} with model.name = {model_name!r}: {e}") from None
    if g in ("neuron", "filter") and cfg.levels > 0:
        _check_units_prune(cfg, st, model_name)


def _check_nm_prunes(cfg: PruneConfig, params: PyTree, st: Structure, model_name: str) -> None:
    """ConfigError when IMP towards N:M would prune no kernel: none that is pruned has a fan-in that
    is a multiple of ``prune.m`` (such kernels stay dense, :mod:`lth.prune.nm`)."""
    grouped, other = grouped_fan_ins(params, cfg, st)
    if grouped or cfg.levels == 0:
        return
    fans = ", ".join(f"{k} {v}" for k, v in other.items()) or "none: every kernel is excluded or has rate 0"
    raise ConfigError(f"prune.granularity = 'n:m' with prune.m = {cfg.m} prunes nothing in model.name = "
                      f"{model_name!r}: a kernel is grouped only when its fan-in is a multiple of m, and no pruned "
                      f"kernel's is (fan-ins: {fans}); use a prune.m that divides one of them")


def _check_units_prune(cfg: PruneConfig, st: Structure, model_name: str) -> None:
    """ConfigError when neuron/filter pruning would remove no unit: every hidden layer of the kind is
    excluded or has rate 0 (:func:`structured_prune` skips those)."""
    kind = "conv" if cfg.granularity == "filter" else "dense"
    layers = [op["layer"] for op in st.chain_layers()[:-1] if op["op"] == kind]
    rate = (cfg.conv_rate if cfg.conv_rate is not None else cfg.rate) if kind == "conv" else cfg.rate
    rates = {n: (cfg.rates or {}).get(n, rate) for n in layers if n not in cfg.exclude}
    if kind == "dense":  # and the MLPs inside blocks (lth.prune.units)
        rates.update({first: mlp_rate(cfg, first, st) for first, _ in st.mlps})
        layers += [first for first, _ in st.mlps]
    if any(r > 0 for r in rates.values()):
        return
    raise ConfigError(f"prune.granularity = {cfg.granularity!r} prunes nothing in model.name = {model_name!r}: its "
                      f"hidden {kind} layers ({', '.join(layers)}) are all in prune.exclude or have rate 0; "
                      "give one of them a rate > 0")


def chain_order(structure: Structure, params: PyTree) -> list[str]:
    """The chain's kernel layers in forward order, checked against ``params``: ValueError naming a
    chain layer that params lack, or a layer with a kernel that the chain leaves out."""
    if structure.chain is None:
        raise ValueError("the model declares no plain chain of layers (Structure.chain)")
    order = [op["layer"] for op in structure.chain_layers()]
    for name in order:
        if name not in params or "kernel" not in params[name]:
            raise ValueError(f"chain layer {name!r} is not a top-level layer with a kernel; top-level layers: "
                             f"{', '.join(params)}")
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "kernel" and "/".join(names[:-1]) not in order:
            raise ValueError(f"layer {'/'.join(names[:-1])!r} has a kernel but is not in the model's chain "
                             f"({', '.join(order)}); its units cannot be removed")
    return order


def chain_norms(structure: Structure) -> dict[str, str]:
    """Kernel layer -> the batch norm that follows it (``norm`` of its chain op)."""
    return {op["layer"]: op["norm"] for op in structure.chain_layers() if op.get("norm")}


def block_names(structure: Structure, params: PyTree) -> list[str]:
    """The declared droppable blocks, checked against ``params`` (ValueError naming a missing one)."""
    for name in structure.blocks:
        if name not in params:
            raise ValueError(f"declared residual block {name!r} is not a top-level submodule; top-level: "
                             f"{', '.join(params)}")
    return list(structure.blocks)


def structured_prune(params: PyTree, mask: PyTree, cfg: PruneConfig, model) -> PyTree:
    """Next mask of one member of ``model`` (a Module or its :class:`Structure`): ``cfg.granularity``
    "neuron"/"filter" prunes ``rate`` (``conv_rate`` for convs) of the surviving units of every hidden
    dense/conv layer of the chain (neurons: and of every MLP the model declares, :func:`mlp_prune`);
    "head" removes attention heads (:func:`head_prune`); "layer" drops declared residual blocks
    (:func:`block_prune`); "n:m"
    moves every group one step towards N:M (:func:`lth.nm.nm_prune`). ValueError naming what the
    model lacks when it does not support the granularity."""
    st = model if isinstance(model, Structure) else structure_of(model)
    if cfg.granularity == "n:m":
        return nm_prune(params, mask, cfg, st)
    if cfg.granularity not in granularities(st):
        raise ValueError(f"prune.granularity = {cfg.granularity!r} is not supported by {type(model).__name__}; it "
                         f"supports {', '.join(granularities(st))}")
    if cfg.granularity == "layer":
        return block_prune(params, mask, cfg, block_names(st, params))
    if cfg.granularity == "head":
        return head_prune(params, mask, cfg, st)
    if cfg.granularity == "neuron" and st.mlps:
        mask = mlp_prune(params, mask, cfg, st)
        if st.chain is None:
            return mask
    new = _copy(mask)
    order, norms = chain_order(st, params), chain_norms(st)
    kinds = {op["layer"]: op["op"] for op in st.chain_layers()}
    kind = "conv" if cfg.granularity == "filter" else "dense"  # filters: conv layers; neurons: fc layers
    for i, name in enumerate(order[:-1]):  # the output layer keeps all its classes
        if name in cfg.exclude or kinds[name] != kind:
            continue
        conv = kind == "conv"
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
        remove_units(new, order, i, drop, norms)
    return new


def remove_units(mask: dict, order: list[str], i: int, units: np.ndarray, norms: dict[str, str] | None = None) -> None:
    """Zero units of layer order[i], their entries in its batch norm (``norms[layer]``; default: the
    naming convention ``conv_i`` -> ``bn_i``) and every input of order[i + 1] that reads them (in place)."""
    name, nxt = order[i], order[i + 1]
    conv = np.ndim(mask[name]["kernel"]) == 4
    mask[name]["kernel"][..., units] = False
    if "bias" in mask[name]:
        mask[name]["bias"][units] = False
    norm = norms.get(name) if norms is not None else (norm_of(name) if name.startswith("conv") else None)
    if norm is not None and norm in mask:  # conv-BN-ReLU (VGG): the channel's BN shift too
        for leaf in mask[norm].values():
            leaf[units] = False
    k = mask[nxt]["kernel"]
    if k.ndim == 4:  # conv -> conv: input channel axis
        k[:, :, units, :] = False
    elif conv:  # conv -> flatten (or global average pool) -> dense: rows are (h, w, c) flattened
        channels = mask[name]["kernel"].shape[-1]
        rows = np.arange(k.shape[0])
        k[np.isin(rows % channels, units), :] = False
    else:
        k[units, :] = False


def is_structured(mask: PyTree, order: list[str], norms: dict[str, str] | None = None) -> bool:
    """The kernel masks are products alive_inputs x alive_units: whole units, gone with their outputs
    (and with their entries of the batch norm ``norms[layer]``; default ``conv_i`` -> ``bn_i``)."""
    prev, prev_name = None, None
    for name in order:
        k = np.asarray(mask[name]["kernel"], bool)
        alive = k.reshape(-1, k.shape[-1]).any(0) if name != order[-1] else np.ones(k.shape[-1], bool)
        rows = np.ones(k.shape[:-1], bool)
        if prev is not None:
            if k.ndim == 4:
                rows = np.broadcast_to(prev, k.shape[:-1])
            elif np.ndim(mask[prev_name]["kernel"]) == 4:
                rows = prev[np.arange(k.shape[0]) % len(prev)]
            else:
                rows = prev
        if not np.array_equal(k, rows[..., None] & alive):
            return False
        norm = norms.get(name) if norms is not None else (norm_of(name) if name.startswith("conv") else None)
        if norm is not None and norm in mask:
            if not all(np.array_equal(np.asarray(v, bool), alive) for v in mask[norm].values()):
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
    """Mask every parameter of block ``name``'s residual branch (in place); identity-shortcut blocks only
    (a block holding a ``conv_shortcut`` projection is refused)."""
    if "conv_shortcut" in mask[name]:
        raise ValueError(f"{name} has a projection shortcut; only identity-shortcut blocks can be dropped")
    for leaf in jax.tree.leaves(mask[name]):
        leaf[...] = False


def block_prune(params: PyTree, mask: PyTree, cfg: PruneConfig, blocks: list[str] | None = None) -> PyTree:
    """Drop ``round_half_up(cfg.rate * n)`` of the n surviving droppable ``blocks`` (default: by the
    naming convention, :func:`droppable_blocks`), lowest :func:`block_score` first (ties: the earlier
    block); blocks named in ``cfg.exclude`` are kept. Returns a new mask."""
    new = _copy(mask)
    blocks = droppable_blocks(params) if blocks is None else blocks
    alive = [n for n in blocks if n not in cfg.exclude and block_alive(new, n)]
    n_drop = int(math.floor(cfg.rate * len(alive) + 0.5))
    scores = [block_score(params[n], new[n], cfg.structure_norm) for n in alive]
    for j in np.argsort(scores, kind="stable")[:n_drop]:
        drop_block(new, alive[j])
    return new


def compact_ops(structure: Structure, params: PyTree) -> list[dict]:
    """The chain ops if :func:`compact` can rebuild them; ValueError naming the layer or op that it cannot."""
    chain_order(structure, params)  # every kernel layer is in the chain
    for op in structure.chain:
        if op.get("norm"):
            raise ValueError(f"layer {op['layer']!r} is followed by batch norm {op['norm']!r}, which compact does "
                             "not rebuild; the pruned network stays masked")
        if op["op"] not in ("dense", "conv", "pool", "flatten"):
            raise ValueError(f"chain op {op['op']!r} is not one compact rebuilds "
                             "(dense, conv, pool, flatten)")
    return list(structure.chain)


def compact(params: PyTree, mask: PyTree, cfg: ModelConfig, num_classes: int, input_shape, model=None):
    """(module, params) of the physically smaller network computing the same function as the masked one.

    ``model`` (default: built from ``cfg``) declares the chain; the result is a
    :class:`lth.models.ChainNet` whose layers have the original names and only the surviving units.
    ValueError naming the layer when the chain has a batch norm or an op compact does not rebuild.
    """
    model = build_model(cfg, num_classes, input_shape) if model is None else model
    st = structure_of(model)
    ops = compact_ops(st, params)
    order = chain_order(st, params)
    keep = {name: alive_units(mask, name) for name in order[:-1]}
    widths = {name: int(k.sum()) for name, k in keep.items()}
    if any(v == 0 for v in widths.values()):
        raise ValueError(f"a layer lost every unit ({widths}); the compact network would be empty")
    small: dict = {}
    prev_keep, prev_conv = None, False
    for name in order:
        w = np.where(mask[name]["kernel"], params[name]["kernel"], 0.0)
        b = np.where(mask[name]["bias"], params[name]["bias"], 0.0) if "bias" in params[name] else None
        if prev_keep is not None:
            if w.ndim == 4:
                w = w[:, :, prev_keep, :]
            elif prev_conv:
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
        prev_keep, prev_conv = keep.get(name), w.ndim == 4
    chain = []
    for op in ops:
        op = dict(op)
        if op["op"] in ("dense", "conv"):
            k = small[op["layer"]]["kernel"]
            op.update(features=int(k.shape[-1]), bias="bias" in small[op["layer"]])
            if op["op"] == "conv":
                op["kernel"] = tuple(int(d) for d in k.shape[:2])
        chain.append(tuple(sorted(op.items())))
    return ChainNet(tuple(chain)), small


COMPACT_RTOL = 1e-4  # compact vs masked outputs: max |difference| <= COMPACT_RTOL * (1 + max |output|)


def compact_run(run_dir, level: int, member: int = 0, batch: int = 1000, repeats: int = 20) -> dict:
    """Compact a stored structurally pruned member; check outputs, time masked vs compact inference."""
    run_dir = Path(run_dir)
    run = StoredRun.open(run_dir)
    run.check_level(level)
    cfg, store, data, model = run.cfg, run.store, run.data, run.model
    params = unstack(load_tree(store.level_dir(level) / "final.msgpack")["params"], member)
    mask = unstack(load_tree(store.level_dir(level) / "masks.msgpack"), member)
    st = structure_of(model)
    extra = {}
    if st.chain is None and compactable(model):  # a transformer: fewer heads and MLP hidden units
        small_model, small_params, removed = compact_blocks(params, mask, model)
        if all(k == n for k, n in [*removed["heads"].values(), *removed["hidden"].values()]):
            raise ValueError(f"level {level} of {run_dir} has no fully pruned attention head or MLP hidden unit "
                             f"(prune.granularity = {cfg.prune.granularity!r}); nothing to compact (prune with "
                             "prune.granularity = 'head' or 'neuron')")
        extra = {"heads_kept": " ".join(f"{k}/{n}" for k, n in removed["heads"].values()),
                 "hidden_kept": " ".join(f"{k}/{n}" for k, n in removed["hidden"].values())}
    else:
        try:
            compact_ops(st, params)
        except ValueError as e:
            raise ConfigError(f"compact cannot rebuild {run_dir} (model {cfg.model.name}, prune.granularity = "
                              f"{cfg.prune.granularity!r}): {e}") from None
        if not is_structured(mask, chain_order(st, params), chain_norms(st)):
            raise ValueError(f"level {level} of {run_dir} is not structurally pruned (prune.granularity = "
                             f"{cfg.prune.granularity!r}); nothing to compact")
        small_model, small_params = compact(params, mask, cfg.model, data.num_classes, data.input_shape, model)
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

    big_out = np.asarray(big_fn(masked, x))
    diff = float(np.max(np.abs(big_out - np.asarray(small_fn(small_params, x)))))
    # float rounding only (a shorter dot product sums the same non-zero terms): far below 1e-4 of the
    # outputs' scale; anything larger means the compact network computes something else
    tolerance = COMPACT_RTOL * (1.0 + float(np.max(np.abs(big_out))))
    n_big = sum(int(np.size(v)) for v in jax.tree.leaves(params))
    n_small = sum(int(np.size(v)) for v in jax.tree.leaves(small_params))
    return {"level": level, "params_masked": n_big, "params_nonzero": int(sum(np.sum(m) for m in jax.tree.leaves(mask))),
            "params_compact": n_small, "max_abs_diff": diff, "tolerance": tolerance, "batch": int(x.shape[0]), **extra,
            "latency_masked_ms": 1e3 * best_time(big_fn, masked),
            "latency_compact_ms": 1e3 * best_time(small_fn, small_params)}

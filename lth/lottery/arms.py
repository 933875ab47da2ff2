"""Control arms: how each arm of a level derives its (weights, mask) from the seed's ticket.

:data:`ARMS` maps an arm's name to ``fn(ArmStart) -> (weights, mask)``; :func:`register` adds one
(in the manner of open_lth's ``lottery/branch/registry.py``). ``small_dense`` is no entry: it trains
a narrower dense model apart from the level's population (:meth:`lth.lottery.runner.Lottery.finish_level`).

- ``ticket``: the IMP mask with the rewind-point weights (Frankle & Carbin 2019);
- ``reinit``: the same mask with a fresh init from another key;
- ``random_prune``: a random mask with the ticket's exact per-layer counts, rewind-point weights;
- ``shuffle``: the ticket's mask permuted within each layer, rewind-point weights;
- ``snip``, ``grasp``, ``synflow``: pruning at initialization (Lee et al. 2019; Wang et al. 2020;
  Tanaka et al. 2020): the criterion of that name scores the ticket's start weights (the rewind
  point: the init for ``rewind.step = 0``, the dense run's step-k weights for late rewinding) and
  keeps as many weights as the ticket keeps in all: ranked over every prunable weight together, as
  published (``prune.pai_allocation = "global"``, the method chooses its per-layer densities), or
  per layer at the ticket's counts (``"ticket"``); the start weights are the ticket's;
- ``snip_shuffle``, ``grasp_shuffle``, ``synflow_shuffle``: those masks permuted within each layer,
  so at the method's own per-layer counts (the layerwise-shuffle ablation of Frankle et al. 2021),
  same start weights;
- ``static``, ``set``, ``rigl``: sparse from scratch (:mod:`lth.prune.dst`): the ticket's start weights
  with a uniformly random mask keeping the ticket's overall count, spread over the layers by
  ``prune.distribution`` (ERK by default); the three arms of a seed start from the same mask. ``static``
  keeps it; ``set`` and ``rigl`` drop and grow during training (the runner passes the engine the
  update, :func:`lth.prune.dst.make_mask_update`).
- ``oneshot_magnitude``, ``wanda``, ``sparsegpt``: one-shot pruning of the seed's *trained dense*
  network (level 0's final weights) to the level's target, layer after layer from ``prune.calib_batches``
  training batches (:mod:`lth.prune.oneshot_net`); at the ticket's per-layer densities
  (``prune.oneshot_allocation = "ticket"``) or every prunable layer at the ticket's overall density
  (``"uniform"``); with ``prune.granularity = "n:m"`` each layer at the ticket's k:m. The member is
  the pruned network itself, evaluated without training; the ``*_ft`` arms (``wanda_ft``, ...) start
  from the same pruned network and are fine-tuned for ``prune.oneshot_finetune_steps`` with the mask
  kept (:mod:`lth.lottery.oneshot`): the arm's name says it trained more.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

from ..prune.criteria import CRITERIA, Signals
from ..prune.dst import layer_counts
from ..prune.masks import keep_counts, keep_global, random_mask_like, shuffle_mask
from ..train import init_population, unstack
from ..trees import to_numpy

# Offsets that separate the rng streams of different uses of one seed (values fixed: results depend on them).
REINIT_KEY = 1_000_003
RANDOM_MASK = 1
SHUFFLE_MASK = 2
PAI_SHUFFLE = {"snip": 4, "grasp": 5, "synflow": 6}
DST_MASK = 3


@dataclass(frozen=True)
class ArmStart:
    """The ticket of one seed at one level, from which an arm derives its member.

    ``weights``: ``{'params', 'batch_stats'}`` the ticket starts from (before masking); ``mask``: its
    bool mask tree; ``can_prune``: per leaf, prunable; ``signals(weights)``: the :class:`Signals` of
    the seed for ``{'params', 'batch_stats'}`` (its criterion batches, the prune settings), which the
    pruning-at-init arms score with."""
    weights: dict
    mask: Any
    can_prune: Any
    seed: int
    level: int
    model: Any
    input_shape: tuple
    signals: Callable[[dict], Signals] | None = None
    memo: dict | None = None  # shared by the arms of one seed and level: masks computed once (snip, snip_shuffle)
    dense: Callable[[], dict] | None = None  # the seed's trained dense network (level 0's final weights)
    calib: Callable[[], np.ndarray] | None = None  # the seed's calibration examples [N, ...] (prune.calib_batches)


Arm = Callable[[ArmStart], tuple[dict, Any]]
ARMS: dict[str, Arm] = {}


def register(name: str) -> Callable[[Arm], Arm]:
    """Decorator: make ``fn(ArmStart) -> (weights, mask)`` the arm ``name``."""
    def add(fn: Arm) -> Arm:
        ARMS[name] = fn
        return fn
    return add


def reinit_weights(model, seed: int, level: int, input_shape) -> dict:
    """The fresh init of the ``reinit`` control of ``seed`` at ``level``: ``{'params', 'batch_stats'}``."""
    key = jax.random.fold_in(jax.random.key(seed + REINIT_KEY), level)
    params, bs = to_numpy(init_population(model, key[None], input_shape))
    return {"params": unstack(params, 0), "batch_stats": unstack(bs, 0)}


@register("ticket")
def ticket(t: ArmStart) -> tuple[dict, Any]:
    return t.weights, t.mask


@register("reinit")
def reinit(t: ArmStart) -> tuple[dict, Any]:
    return reinit_weights(t.model, t.seed, t.level, t.input_shape), t.mask


@register("random_prune")
def random_prune(t: ArmStart) -> tuple[dict, Any]:
    return t.weights, random_mask_like(t.mask, t.can_prune, np.random.default_rng([t.seed, t.level, RANDOM_MASK]))


@register("shuffle")
def shuffle(t: ArmStart) -> tuple[dict, Any]:
    return t.weights, shuffle_mask(t.mask, t.can_prune, np.random.default_rng([t.seed, t.level, SHUFFLE_MASK]))


def pai_mask(t: ArmStart, criterion: str) -> Any:
    """The mask that ``criterion`` gives the ticket's start weights with as many survivors as the ticket:
    pooled over the prunable leaves (``prune.pai_allocation = "global"``) or per leaf (``"ticket"``)."""
    if t.memo is not None and criterion in t.memo:
        return t.memo[criterion]
    counts = jax.tree.map(lambda m: int(np.sum(m)), t.mask)
    sig = t.signals(t.weights)
    if sig.cfg.pai_allocation == "ticket":
        sig = dataclasses.replace(sig, keep=counts)
        mask = keep_counts(CRITERIA[criterion](t.weights["params"], sig), counts)
    else:
        total = sum(c for c, p in zip(jax.tree.leaves(counts), jax.tree.leaves(t.can_prune)) if p)
        sig = dataclasses.replace(sig, keep=total, can_prune=t.can_prune)
        mask = keep_global(CRITERIA[criterion](t.weights["params"], sig), t.can_prune, total)
    if t.memo is not None:
        t.memo[criterion] = mask
    return mask


def _pai_arms(criterion: str) -> None:
    def arm(t: ArmStart) -> tuple[dict, Any]:
        return t.weights, pai_mask(t, criterion)

    def shuffled(t: ArmStart) -> tuple[dict, Any]:
        rng = np.random.default_rng([t.seed, t.level, PAI_SHUFFLE[criterion]])
        return t.weights, shuffle_mask(pai_mask(t, criterion), t.can_prune, rng)

    register(criterion)(arm)
    register(f"{criterion}_shuffle")(shuffled)


for _name in ("snip", "grasp", "synflow"):
    _pai_arms(_name)


def dst_mask(t: ArmStart, distribution: str) -> Any:
    """The start mask of the sparse-from-scratch arms: as many weights as the ticket keeps over its
    prunable leaves, per leaf by ``distribution`` (:func:`lth.prune.dst.layer_counts`), each leaf's
    survivors drawn uniformly at random (``rng([seed, level, DST_MASK])``); other leaves kept whole."""
    flat = jax.tree_util.tree_flatten_with_path(t.mask)[0]
    can = jax.tree.leaves(t.can_prune)
    names = {jax.tree_util.keystr(path): np.asarray(m).shape for (path, m), p in zip(flat, can) if p}
    ticket = {jax.tree_util.keystr(path): int(np.sum(m)) for (path, m), p in zip(flat, can) if p}
    counts = layer_counts(names, sum(ticket.values()), distribution, ticket)
    rng = np.random.default_rng([t.seed, t.level, DST_MASK])
    out = []
    for (path, m), p in zip(flat, can):
        m = np.asarray(m, bool)
        if not p:
            out.append(m.copy())
            continue
        keep = np.zeros(m.size, bool)
        keep[rng.choice(m.size, size=counts[jax.tree_util.keystr(path)], replace=False)] = True
        out.append(keep.reshape(m.shape))
    return jax.tree.unflatten(jax.tree.structure(t.mask), out)


def _dst_arm(name: str) -> None:
    def arm(t: ArmStart) -> tuple[dict, Any]:
        if t.memo is not None and "dst" in t.memo:
            return t.weights, t.memo["dst"]
        mask = dst_mask(t, t.signals(t.weights).cfg.distribution)
        if t.memo is not None:
            t.memo["dst"] = mask
        return t.weights, mask

    register(name)(arm)


# One-shot pruning of the trained dense network: arm -> method of lth.prune.oneshot_net. The *_ft arms
# start from the same pruned network and are fine-tuned (lth.lottery.oneshot), their names say so.
ONESHOT = {"oneshot_magnitude": "magnitude", "wanda": "wanda", "sparsegpt": "sparsegpt"}
ONESHOT_ARMS = {**ONESHOT, **{f"{a}_ft": m for a, m in ONESHOT.items()}}


def oneshot_targets(t: ArmStart) -> dict:
    """``{kernel path: density or (k, m)}`` of the one-shot arms of ``t``'s seed and level, from the ticket's
    mask: n:m granularity: each grouped kernel at the ticket's k:m; else ``prune.oneshot_allocation``
    "ticket" (each prunable kernel at the ticket's density there) or "uniform" (every prunable kernel at
    the ticket's overall density over the prunable leaves)."""
    from flax import traverse_util

    pc = t.signals(t.weights).cfg
    mask = traverse_util.flatten_dict(t.mask)
    can = traverse_util.flatten_dict(t.can_prune)
    kernels = [k for k, m in mask.items() if can[k] and np.ndim(m) >= 2]
    out = {}
    if pc.granularity == "n:m":
        for k in kernels:
            m = mask[k]
            if (m.size // m.shape[-1]) % pc.m:
                continue  # fan-in not grouped: the ticket keeps it dense
            kept = int(np.sum(m)) // (m.size // pc.m)
            if kept < pc.m:
                out[k] = (kept, pc.m)
        return out
    if pc.oneshot_allocation == "uniform":
        total = sum(int(np.sum(m)) for k, m in mask.items() if can[k])
        size = sum(int(np.size(m)) for k, m in mask.items() if can[k])
        return {k: total / size for k in kernels}
    return {k: int(np.sum(mask[k])) / mask[k].size for k in kernels}


def prepare_oneshot(starts: list[tuple[str, ArmStart]]) -> None:
    """Prune, for every (one-shot arm, seed) of a level, the seed's trained dense network together
    (one population, :func:`lth.prune.oneshot_net.prune_population`); each result goes to the seed's
    memo, where the arm reads it. A method's result is shared by its plain and ``*_ft`` arm."""
    from ..prune.oneshot_net import prune_population

    todo, seen = [], set()
    for arm, t in starts:
        method = ONESHOT_ARMS[arm]
        if ("oneshot", method) in t.memo or (t.seed, method) in seen:
            continue
        seen.add((t.seed, method))
        todo.append((method, t))
    if not todo:
        return
    dense = [t.dense() for _, t in todo]
    xs = [t.calib() if m != "magnitude" else None for m, t in todo]  # equal shapes: calib_batches x batch_size
    params, masks = prune_population(todo[0][1].model, [m for m, _ in todo], [d["params"] for d in dense],
                                     [d["batch_stats"] for d in dense], xs, [oneshot_targets(t) for _, t in todo])
    for (method, t), d, p, mk in zip(todo, dense, params, masks):
        t.memo[("oneshot", method)] = ({"params": p, "batch_stats": d["batch_stats"]}, mk)


def _oneshot_arm(name: str) -> None:
    method = ONESHOT_ARMS[name]

    def arm(t: ArmStart) -> tuple[dict, Any]:
        if ("oneshot", method) not in t.memo:
            prepare_oneshot([(name, t)])
        return t.memo[("oneshot", method)]

    register(name)(arm)


for _name in ("static", "set", "rigl"):
    _dst_arm(_name)

for _name in ONESHOT_ARMS:
    _oneshot_arm(_name)

"""Control arms: how each arm of a level derives its (weights, mask) from the seed's ticket.

:data:`ARMS` maps an arm's name to ``fn(ArmStart) -> (weights, mask)``; :func:`register` adds one
(in the manner of open_lth's ``lottery/branch/registry.py``). ``small_dense`` is no entry: it trains
a narrower dense model apart from the level's population (:meth:`lth.lottery.runner.Lottery.finish_level`).

- ``ticket``: the IMP mask with the rewind-point weights (Frankle & Carbin 2019);
- ``reinit``: the same mask with a fresh init from another key;
- ``random_prune``: a random mask with the ticket's exact per-layer counts, rewind-point weights;
- ``shuffle``: the ticket's mask permuted within each layer, rewind-point weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

from ..prune.masks import random_mask_like, shuffle_mask
from ..train import init_population, unstack
from ..trees import to_numpy

# Offsets that separate the rng streams of different uses of one seed (values fixed: results depend on them).
REINIT_KEY = 1_000_003
RANDOM_MASK = 1
SHUFFLE_MASK = 2


@dataclass(frozen=True)
class ArmStart:
    """The ticket of one seed at one level, from which an arm derives its member.

    ``weights``: ``{'params', 'batch_stats'}`` the ticket starts from (before masking); ``mask``: its
    bool mask tree; ``can_prune``: per leaf, prunable."""
    weights: dict
    mask: Any
    can_prune: Any
    seed: int
    level: int
    model: Any
    input_shape: tuple


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

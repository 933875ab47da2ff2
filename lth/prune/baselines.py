"""Small-dense baselines: a dense model of the same family whose parameter count matches a ticket's.

Zhu & Gupta 2017 ("To prune, or not to prune") compare large-sparse against small-dense networks of
equal non-zero parameter count; here the width multiplier ``model.width`` is searched so the dense
count is as close as possible to the target.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Sequence

import jax
import jax.numpy as jnp

from ..config import ModelConfig
from ..models import build_model, param_count


@lru_cache(maxsize=4096)
def count_at_width(cfg: ModelConfig, width: float, num_classes: int, input_shape: tuple[int, ...]) -> int:
    """Parameter count of ``cfg`` at ``width`` (shapes only, nothing allocated)."""
    model = build_model(dataclasses.replace(cfg, width=width), num_classes, input_shape)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    return param_count(shapes["params"])


def match_width(cfg: ModelConfig, num_classes: int, input_shape: Sequence[int], target: int,
                iters: int = 40) -> tuple[float, int]:
    """(width, parameter count) of the dense model closest to ``target`` parameters.

    The count grows monotonically with the width (up to rounding of layer sizes), so bisect on the
    width in [1e-4, cfg.width] and keep the best of the points visited.
    """
    shape = tuple(input_shape)
    lo, hi = 1e-4, cfg.width
    best = (cfg.width, count_at_width(cfg, cfg.width, num_classes, shape))
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = count_at_width(cfg, mid, num_classes, shape)
        if abs(n - target) < abs(best[1] - target):
            best = (mid, n)
        if n < target:
            lo = mid
        else:
            hi = mid
    return best

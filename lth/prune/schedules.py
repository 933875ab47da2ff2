"""Pruning schedules: how much to prune when (Zhu & Gupta 2017's gradual AGP; one-shot to a target)."""

from __future__ import annotations

import dataclasses

from ..config import PruneConfig


def agp_density(step: int, cfg: PruneConfig) -> float:
    """Target density of the gradual schedule at ``step`` (Zhu & Gupta 2017, eq. 1).

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 with s_i = 0 and s_f = 1 - target_density,
    held constant before t0 and after t0 + n dt.
    """
    s_f = 1.0 - cfg.target_density
    t = min(max(step - cfg.agp_start_step, 0), cfg.agp_updates * cfg.agp_frequency)
    sparsity = s_f + (0.0 - s_f) * (1.0 - t / (cfg.agp_updates * cfg.agp_frequency)) ** 3
    return 1.0 - sparsity


def oneshot_config(cfg: PruneConfig) -> PruneConfig:
    """The rates that take every prunable layer from dense to ``target_density`` in one step."""
    r = 1.0 - cfg.target_density
    return dataclasses.replace(cfg, rate=r, conv_rate=r, output_rate=r, rates=None)

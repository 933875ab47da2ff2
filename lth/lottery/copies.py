"""Which members of a level train a stability copy (``[stability]``; :mod:`lth.lottery.stability`).

Depends on the config only, so the runner (which adds the copies to a level's population) and the
stability stage (which evaluates them) agree without importing each other.
"""

from __future__ import annotations

from ..config import ONESHOT_ARMS, ExperimentConfig


def stability_levels(cfg: ExperimentConfig) -> list[int]:
    """The levels ``stability.levels`` names (listed levels past ``prune.levels`` skipped)."""
    last, levels = cfg.prune.levels, cfg.stability.levels
    if levels == "all":
        return list(range(last + 1))
    if levels == "last":
        return [last]
    return sorted(int(x) for x in levels if x <= last)


def copy_arms(cfg: ExperimentConfig, level: int) -> set[str]:
    """Arms of ``level`` whose members train a stability copy (none when ``[stability]`` is off).
    Level 0 is the dense network: the ticket arm."""
    sc = cfg.stability
    if not sc.enabled or level not in stability_levels(cfg):
        return set()
    # small-dense trains apart; a one-shot arm evaluated as pruned does not train (its copy would be itself)
    arms = ["ticket"] if level == 0 else [a for a in cfg.arms if a != "small_dense" and a not in ONESHOT_ARMS]
    return {a for a in arms if sc.arms is None or a in sc.arms}

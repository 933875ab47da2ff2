"""The lottery: iterative magnitude pruning with rewinding, its control arms and population groups.

- :mod:`~lth.lottery.runner`: :class:`Lottery` (one run, level by level, resumable), :func:`run_lottery`
  and the level tables (metrics, sparsity);
- :mod:`~lth.lottery.arms`: the control arms (ticket, reinit, random_prune, shuffle) and the
  pruning-at-init arms (snip, grasp, synflow and their layerwise shuffles) by name;
- :mod:`~lth.lottery.earlybird`: early-bird mask distances recorded during the dense level;
- :mod:`~lth.lottery.groups`: several runs that train each level together as one population;
- :mod:`~lth.lottery.masked`: training a given mask (``lth train --mask``).
"""

from .arms import ARMS
from .groups import population_key, run_group
from .runner import Lottery, Member, run_lottery

__all__ = ["ARMS", "Lottery", "Member", "population_key", "run_group", "run_lottery"]

"""Pruning: everything that turns a trained network into a mask. Knows no training loop.

- :mod:`~lth.prune.masks`: masks and selection (scores -> mask at exact per-layer counts, densities,
  random and shuffled controls' masks);
- :mod:`~lth.prune.criteria`: the score functions, registered by name (``prune.criterion``), with the
  gradient and Hessian signals of :mod:`~lth.prune.signals`;
- :mod:`~lth.prune.schedules`: when to prune how much (gradual AGP, one-shot);
- :mod:`~lth.prune.structured` and :mod:`~lth.prune.nm`: unit, filter, block and N:M pruning, compaction;
- :mod:`~lth.prune.baselines`: small-dense widths matching a ticket's parameter count;
- :mod:`~lth.prune.sensitivity`: per-layer pruning sensitivity of a stored level.
"""

"""Small pytree helpers shared by the pruning, lottery and quantization code.

``stack``/``unstack`` (the population axis) live in :mod:`lth.train`; these are the host/device
copies, stacked keys and kept counts.
"""

from __future__ import annotations

import jax
import numpy as np


def to_numpy(tree):
    """Host (numpy) copy of a pytree."""
    return jax.tree.map(np.asarray, tree)


def to_device(tree):
    """Device copy of a host pytree (``jax.device_put``: jnp.asarray would compile a program per shape)."""
    return jax.device_put(tree)


def seed_keys(seeds, fold: int | None = None) -> jax.Array:
    """Stacked PRNG keys ``[K]``: key(seed), optionally folded with ``fold``."""
    make = (lambda s: jax.random.key(s)) if fold is None else (lambda s: jax.random.fold_in(jax.random.key(s), fold))
    return jax.vmap(make)(np.asarray(seeds))


def kept_count(mask) -> int:
    """Parameters a mask keeps (weights and unpruned biases/norm parameters)."""
    return int(sum(np.asarray(m).sum() for m in jax.tree.leaves(mask)))

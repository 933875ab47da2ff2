"""Sparse training from scratch: layer budgets (ERK, uniform) and the drop-and-grow mask update of
SET (Mocanu et al. 2018) and RigL (Evci et al. 2020). Pure jnp, one layer at a time; every update
keeps the layer's number of active weights exactly.

- **ERK** (Evci et al. 2020, Sec. 3 "Sparsity distribution"; Erdos-Renyi-Kernel after Mocanu et
  al.'s Erdos-Renyi): layer l keeps a density proportional to ``sum(shape) / prod(shape)``
  (``(n_in + n_out) / (n_in n_out)`` for a dense layer, ``(kh + kw + c_in + c_out) / (kh kw c_in
  c_out)`` for a conv), scaled by one factor so that the network keeps the target count; a layer
  that would exceed density 1 is made dense and the factor recomputed over the others.
- **Drop fraction** (RigL Eq. 1): ``f(t) = alpha / 2 (1 + cos(pi t / T_end))`` for ``t < T_end``,
  then no more updates.
- **Update** at a step: drop the ``k = round(f(t) * n_active)`` active weights of smallest ``|w|``,
  grow ``k`` of the weights inactive after the drop (the dropped ones included): RigL the largest
  dense-gradient magnitude ``|dL/dw|``, SET uniformly at random. Grown weights start at 0.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def erk_densities(shapes: dict[str, Sequence[int]], density: float, *, power: float = 1.0,
                  dense: Sequence[str] = ()) -> dict[str, float]:
    """Per-layer densities of the ERK distribution at overall ``density`` (kept / all weights of
    ``shapes``). ``dense`` names layers kept dense from the start. Layers whose ERK density would
    exceed 1 are clamped to 1 and the scale is recomputed over the rest (Evci et al.'s loop)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density = {density}: must be in (0, 1]")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    full = set(dense)
    while True:
        budget = density * total - sum(sizes[n] for n in full)
        free = [n for n in shapes if n not in full]
        if not free:
            break
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        full.update(over)
    return {n: 1.0 if n in full else max(0.0, eps * raw[n]) for n in shapes}


def uniform_densities(shapes: dict[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer at ``density``."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density = {density}: must be in (0, 1]")
    return {n: density for n in shapes}


def drop_fraction(step, *, alpha: float, end_step: int) -> jax.Array:
    """RigL's cosine-annealed drop fraction at ``step`` (0 from ``end_step`` on)."""
    t = jnp.asarray(step, jnp.float32)
    f = alpha / 2.0 * (1.0 + jnp.cos(jnp.pi * t / end_step))
    return jnp.where(t < end_step, f, 0.0)


def _rank(score, descending: bool) -> jax.Array:
    """0 for the best entry of the flat ``score`` (ties: the lower index first)."""
    flat = score.reshape(-1)
    order = jnp.argsort(-flat if descending else flat, stable=True)
    return jnp.argsort(order, stable=True).reshape(score.shape)


def update_mask(w, mask, fraction, *, grow_score) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One drop-and-grow update of one layer.

    Args:
      w: the layer's weights (pruned entries are 0); mask: its 0/1 mask, same shape.
      fraction: the drop fraction now (:func:`drop_fraction`), a scalar.
      grow_score: the grow criterion, same shape (RigL: ``|dL/dw|`` of the dense gradient; SET:
        uniform random numbers); the highest inactive entries grow.

    Returns:
      ``(mask, w, k)``: the new mask (same number of ones), the weights with dropped entries zeroed
      and grown entries set to 0, and ``k``, the number of weights regrown.
    """
    active = mask > 0
    n_active = jnp.sum(active)
    k = jnp.round(fraction * n_active).astype(jnp.int32)
    drop_rank = _rank(jnp.where(active, jnp.abs(w), jnp.inf), descending=False)
    dropped = active & (drop_rank < k)
    kept = active & ~dropped
    grow_rank = _rank(jnp.where(kept, -jnp.inf, grow_score), descending=True)
    grown = ~kept & (grow_rank < k)
    new = kept | grown
    return new.astype(mask.dtype), jnp.where(kept, w, 0.0).astype(w.dtype), k


def random_grow_score(key, shape) -> jax.Array:
    """SET's grow criterion: i.i.d. uniform scores, one draw per update (``fold_in(key, step)``)."""
    return jax.random.uniform(key, shape)


# ---------------------------------------------------------------------------- arms: start masks and the hook

DISTRIBUTIONS = ("erk", "uniform", "ticket")
# The member argument of the mask update (Engine.run's member_args): what each member does at an update.
STATIC, SET, RIGL = 0, 1, 2
MODES = {"static": STATIC, "set": SET, "rigl": RIGL}


def layer_counts(shapes: dict[str, Sequence[int]], total: int, distribution: str,
                 ticket: dict[str, int] | None = None) -> dict[str, int]:
    """Weights kept per layer so that the layers of ``shapes`` keep ``total`` in all.

    ``distribution``: ``erk`` (:func:`erk_densities`), ``uniform`` or ``ticket`` (``ticket``'s counts as
    they are). Fractional counts are rounded by largest remainder, so the sum is exactly ``total``."""
    if distribution == "ticket":
        if ticket is None:
            raise ValueError("distribution 'ticket' needs the ticket's per-layer counts")
        return dict(ticket)
    if distribution not in ("erk", "uniform"):
        raise ValueError(f"distribution = {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    dens = total / sum(sizes.values())
    d = erk_densities(shapes, dens) if distribution == "erk" else uniform_densities(shapes, dens)
    raw = {n: min(d[n], 1.0) * sizes[n] for n in shapes}
    counts = {n: int(math.floor(raw[n])) for n in shapes}
    short = total - sum(counts.values())
    for n in sorted(shapes, key=lambda n: (-(raw[n] - counts[n]), n)):  # largest remainder first
        if short <= 0:
            break
        if counts[n] < sizes[n]:
            counts[n] += 1
            short -= 1
    return counts


def make_mask_update(can_prune, *, delta_t: int, end_step: int, alpha: float) -> Callable:
    """The engine's ``mask_fn`` (:class:`lth.train.Engine`) of the sparse-from-scratch arms.

    At the global steps ``t = delta_t, 2 delta_t, ... < end_step`` every prunable leaf of a member with
    argument :data:`SET` or :data:`RIGL` is updated by :func:`update_mask` with the drop fraction
    :func:`drop_fraction` ``(t)``: RigL grows by ``|dL/dw|`` of the step's dense gradient, SET by uniform
    scores drawn from ``fold_in(member rng, t)``. :data:`STATIC` members (and every other step) keep
    their mask. A pure function of (step, weights, mask, gradient, rng): a resumed run updates exactly
    as an uninterrupted one. Info: ``{"regrown": int32 [L]}`` per prunable leaf (tree order), -1 on
    steps without an update."""
    which = [bool(p) for p in jax.tree.leaves(can_prune)]

    def update(t, params, mask, grads, rng, mode):
        leaves_m, tree = jax.tree.flatten(mask)
        leaves_w, leaves_g = jax.tree.leaves(params), jax.tree.leaves(grads)
        due = (t > 0) & (t % delta_t == 0) & (t < end_step)

        def go(_):
            frac = drop_fraction(t, alpha=alpha, end_step=end_step)
            key = jax.random.fold_in(rng, t)
            out, counts = [], []
            for j, (w, m, g, p) in enumerate(zip(leaves_w, leaves_m, leaves_g, which)):
                if not p:
                    out.append(m)
                    continue
                score = jnp.where(mode == RIGL, jnp.abs(g), random_grow_score(jax.random.fold_in(key, j), m.shape))
                new, _, k = update_mask(w, m.astype(jnp.float32), frac, grow_score=score)
                moving = mode != STATIC
                out.append(jnp.where(moving, new > 0, m))
                counts.append(jnp.where(moving, k, 0))
            return out, jnp.stack(counts).astype(jnp.int32)

        def stay(_):
            return list(leaves_m), jnp.full((sum(which),), -1, jnp.int32)

        out, regrown = jax.lax.cond(due, go, stay, None)
        return jax.tree.unflatten(tree, out), {"regrown": regrown}

    return update


def update_steps(start: int, stop: int, *, delta_t: int, end_step: int) -> list[int]:
    """The global steps in ``[start, stop)`` at which :func:`make_mask_update` updates masks."""
    return [t for t in range(max(start, 1), min(stop, end_step)) if t % delta_t == 0]


def training_flops(f_sparse: float, f_dense: float, steps: int, batch: int, dense_grad_steps: int = 0) -> float:
    """Training FLOPs of one member, as counted by Evci et al. 2020 (App. H): a step costs ``3 f_S``
    per example (forward, gradient w.r.t. activations, w.r.t. weights), ``f_S`` the sparse forward
    FLOPs; at each of RigL's ``dense_grad_steps`` the weight gradient is dense: ``2 f_S + f_D``."""
    return batch * ((steps - dense_grad_steps) * 3.0 * f_sparse + dense_grad_steps * (2.0 * f_sparse + f_dense))

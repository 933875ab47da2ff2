"""ERK budgets and the SET/RigL drop-and-grow update (Evci et al. 2020; Mocanu et al. 2018)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.prune.dst import drop_fraction, erk_densities, random_grow_score, uniform_densities, update_mask

SHAPES = {"dense_0": (784, 300), "dense_1": (300, 100), "output": (100, 10)}


def test_erk_formula_and_clamp():
    d = erk_densities(SHAPES, 0.1)
    sizes = {n: math.prod(s) for n, s in SHAPES.items()}
    # the output layer's ERK density (110/1000 * eps) exceeds 1 at 10%: clamped dense
    assert d["output"] == 1.0
    # the others share one scale eps: density_l = eps * (n_in + n_out) / (n_in * n_out)
    eps = (0.1 * sum(sizes.values()) - sizes["output"]) / sum(sum(SHAPES[n]) for n in ("dense_0", "dense_1"))
    for n in ("dense_0", "dense_1"):
        assert d[n] == pytest.approx(eps * sum(SHAPES[n]) / sizes[n])
    kept = sum(d[n] * sizes[n] for n in SHAPES)
    assert kept == pytest.approx(0.1 * sum(sizes.values()))
    assert d["dense_1"] > d["dense_0"]  # smaller layers keep more


def test_erk_conv_uses_kernel_dims_and_uniform_is_flat():
    shapes = {"conv": (3, 3, 64, 64), "fc": (4096, 256)}
    d = erk_densities(shapes, 0.2)
    ratio = d["conv"] / d["fc"]
    assert ratio == pytest.approx(((3 + 3 + 64 + 64) / (9 * 64 * 64)) / ((4096 + 256) / (4096 * 256)))
    assert uniform_densities(shapes, 0.2) == {"conv": 0.2, "fc": 0.2}
    with pytest.raises(ValueError, match="density"):
        erk_densities(shapes, 0.0)


def test_drop_fraction_is_cosine_annealed_and_stops():
    assert float(drop_fraction(0, alpha=0.3, end_step=100)) == pytest.approx(0.3)
    assert float(drop_fraction(50, alpha=0.3, end_step=100)) == pytest.approx(0.15)
    assert float(drop_fraction(100, alpha=0.3, end_step=100)) == 0.0


def test_rigl_drops_smallest_and_grows_largest_gradient_with_exact_count():
    rng = np.random.default_rng(0)
    mask = (rng.random((20, 30)) < 0.2).astype(np.float32)
    w = rng.normal(size=mask.shape).astype(np.float32) * mask
    g = rng.normal(size=mask.shape).astype(np.float32)
    new, w2, k = update_mask(jnp.asarray(w), jnp.asarray(mask), 0.3, grow_score=jnp.abs(jnp.asarray(g)))
    new, w2, k = np.asarray(new), np.asarray(w2), int(k)
    assert k == round(0.3 * mask.sum()) and new.sum() == mask.sum()
    kept = (mask == 1) & (w2 != 0)  # survivors keep their (non-zero) values
    dropped, grown = (mask == 1) & ~kept, (new == 1) & ~kept  # a dropped weight may grow back at 0
    assert dropped.sum() == k and grown.sum() == k
    assert np.abs(w[dropped]).max() <= np.abs(w[kept]).min()  # the k smallest |w| of the active
    assert np.abs(g[grown]).min() >= np.abs(g[~kept & ~grown]).max()  # the k largest |g| of the rest
    assert np.all(w2[~kept] == 0) and np.array_equal(w2[kept], w[kept])


def test_set_grows_at_random_and_keeps_the_count_under_jit():
    mask = jnp.asarray((np.random.default_rng(1).random((50, 40)) < 0.1).astype(np.float32))
    w = jax.random.normal(jax.random.key(0), mask.shape) * mask
    step = jax.jit(lambda w, m, key: update_mask(w, m, 0.3, grow_score=random_grow_score(key, m.shape)))
    m1, _, _ = step(w, mask, jax.random.key(1))
    m2, _, _ = step(w, mask, jax.random.key(2))
    assert float(m1.sum()) == float(mask.sum()) == float(m2.sum())
    assert not np.array_equal(np.asarray(m1), np.asarray(m2))  # the regrown set depends on the draw


def test_training_flops_count_rigls_dense_gradients():
    from lth.prune.dst import training_flops

    assert training_flops(10.0, 100.0, steps=50, batch=2) == 2 * 50 * 30.0
    # 3 of 50 steps pay the dense weight gradient: 2 f_S + f_D instead of 3 f_S
    assert training_flops(10.0, 100.0, steps=50, batch=2, dense_grad_steps=3) == 2 * (47 * 30.0 + 3 * 120.0)

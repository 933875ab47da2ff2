"""Pruning: exact per-layer rates, nested masks, controls keep per-layer counts."""

import jax
import numpy as np
import pytest

from lth.config import ModelConfig, PruneConfig
from lth.models import build_model
from lth.prune.masks import (density, expected_counts, layer_rates, magnitude_prune, prunable, random_mask_like,
                         shuffle_mask, sparsity_rows)


def mlp_params(seed=0):
    model = build_model(ModelConfig(name="mlp", widths=(30, 20)), 10, (40,))
    return jax.tree.map(np.asarray, model.init(jax.random.key(seed), np.zeros((1, 40)))["params"])


def ones(params):
    return jax.tree.map(lambda p: np.ones(p.shape, bool), params)


def test_rates_per_layer_kind():
    p = mlp_params()
    r = layer_rates(p, PruneConfig(rate=0.2))
    assert r["dense_0"]["kernel"] == 0.2 and r["output"]["kernel"] == 0.1 and r["dense_0"]["bias"] == 0.0
    r = layer_rates(p, PruneConfig(rate=0.2, output_rate=0.3, exclude=("dense_1",), prune_biases=True))
    assert r["output"]["kernel"] == 0.3 and r["dense_1"]["kernel"] == 0.0 and r["dense_0"]["bias"] == 0.2


def test_layerwise_magnitude_pruning_is_exact_nested_and_removes_smallest():
    cfg = PruneConfig(rate=0.2, output_rate=0.1)
    params, mask = mlp_params(), ones(mlp_params())
    can = prunable(params, cfg)
    for level in range(1, 6):
        new = magnitude_prune(params, mask, cfg)
        expected = expected_counts(params, cfg, level)
        for path_m, old_m, exp in zip(jax.tree.leaves(new), jax.tree.leaves(mask), jax.tree.leaves(expected)):
            assert int(path_m.sum()) == exp  # exact count from the rate schedule
            assert np.all(path_m <= old_m)  # nested: nothing comes back
        # the removed weights are the smallest surviving magnitudes of their layer
        k_old, k_new = mask["dense_0"]["kernel"], new["dense_0"]["kernel"]
        removed = np.abs(params["dense_0"]["kernel"][k_old & ~k_new])
        kept = np.abs(params["dense_0"]["kernel"][k_new])
        assert removed.max() <= kept.min()
        mask = new
    # 40*30 = 1200 -> 960 -> 768 -> 614 -> 491 -> 393 (round half up of 20% of the remaining)
    assert int(mask["dense_0"]["kernel"].sum()) == 393
    assert np.all(mask["dense_0"]["bias"])  # biases never pruned by default
    assert density(mask, can) == pytest.approx(
        sum(int(m.sum()) for m, c in zip(jax.tree.leaves(mask), jax.tree.leaves(can)) if c)
        / sum(m.size for m, c in zip(jax.tree.leaves(mask), jax.tree.leaves(can)) if c))


def test_global_scope_prunes_the_pooled_rate():
    cfg = PruneConfig(rate=0.5, scope="global")
    params = mlp_params()
    mask = magnitude_prune(params, ones(params), cfg)
    can = prunable(params, cfg)
    total = sum(p.size for p, c in zip(jax.tree.leaves(params), jax.tree.leaves(can)) if c)
    kept = sum(int(m.sum()) for m, c in zip(jax.tree.leaves(mask), jax.tree.leaves(can)) if c)
    assert kept == total - int(np.floor(0.5 * total + 0.5))
    threshold = min(np.abs(p[m]).min() for p, m, c in zip(jax.tree.leaves(params), jax.tree.leaves(mask),
                                                          jax.tree.leaves(can)) if c)
    dropped = max(np.abs(p[~m]).max() for p, m, c in zip(jax.tree.leaves(params), jax.tree.leaves(mask),
                                                         jax.tree.leaves(can)) if c and (~m).any())
    assert dropped <= threshold


@pytest.mark.parametrize("control", [random_mask_like, shuffle_mask])
def test_controls_keep_the_tickets_per_layer_counts(control):
    cfg = PruneConfig(rate=0.6)
    params = mlp_params()
    ticket = magnitude_prune(params, ones(params), cfg)
    can = prunable(params, cfg)
    other = control(ticket, can, np.random.default_rng(0))
    for t, o in zip(jax.tree.leaves(ticket), jax.tree.leaves(other)):
        assert int(t.sum()) == int(o.sum())
    assert not np.array_equal(ticket["dense_0"]["kernel"], other["dense_0"]["kernel"])
    again = control(ticket, can, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(again)))


def test_sparsity_rows_report_counts():
    cfg = PruneConfig(rate=0.5)
    params = mlp_params()
    mask = magnitude_prune(params, ones(params), cfg)
    masked = jax.tree.map(lambda p, m: np.where(m, p, 0), params, mask)
    rows = {r["layer"]: r for r in sparsity_rows(masked, mask, prunable(params, cfg))}
    assert rows["dense_0/kernel"]["count"] == 1200 and rows["dense_0/kernel"]["kept"] == 600
    assert rows["dense_0/kernel"]["nonzero"] == 600 and rows["dense_0/kernel"]["density"] == 0.5
    assert rows["output/kernel"]["kind"] == "output" and rows["dense_0/bias"]["prunable"] is False

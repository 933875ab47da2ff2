"""Pruning criteria and schedules: saliency/OBD signals by finite differences, AGP, one-shot."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from analysis import load_runs
from lth.config import PruneConfig
from lth.lottery import run_lottery
from lth.prune.criteria import obd_scores, saliency_scores
from lth.prune.schedules import agp_density
from lth.prune.signals import _loss, activation_sparsity, hessian_diagonal, mean_gradient
from lth.store import load_tree, read_parquet
from helpers import tiny


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(5, name="dense_0")(x))
        return nn.Dense(3, name="output")(x)


def setup():
    model = Tiny()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 3, 16).astype(np.int32)
    params = model.init(jax.random.key(1), x)["params"]
    return model, params, [(x[:8], y[:8]), (x[8:], y[8:])]


def total_loss(model, params, batches):
    return np.mean([float(_loss(model, params, {}, jnp.asarray(x), jnp.asarray(y))) for x, y in batches])


def bump(params, name, idx, h):
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.at[idx].add(h) if "/".join(k.key for k in path) == name else p, params)


def test_saliency_matches_finite_difference_gradient():
    model, params, batches = setup()
    grads = mean_gradient(model, params, {}, batches)
    scores = saliency_scores(params, grads)
    for name, idx in [("dense_0/kernel", (1, 2)), ("output/kernel", (3, 0)), ("output/kernel", (0, 2))]:
        h = 1e-3
        fd = (total_loss(model, bump(params, name, idx, h), batches)
              - total_loss(model, bump(params, name, idx, -h), batches)) / (2 * h)
        layer, leaf = name.split("/")
        w = float(params[layer][leaf][idx])
        assert float(grads[layer][leaf][idx]) == pytest.approx(fd, rel=2e-2, abs=1e-4)
        assert scores[layer][leaf][idx] == pytest.approx(abs(w * fd), rel=2e-2, abs=1e-4)


def test_obd_hessian_diagonal_matches_exact_and_finite_difference():
    model, params, batches = setup()
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    exact = np.mean([np.diag(jax.hessian(lambda f: _loss(model, unravel(f), {}, jnp.asarray(x), jnp.asarray(y)))(flat))
                     for x, y in batches], axis=0)
    est = hessian_diagonal(model, params, {}, batches, jax.random.key(0), samples=4000)
    est_flat = np.asarray(jax.flatten_util.ravel_pytree(est)[0])
    # Hutchinson is unbiased; 4000 probes per batch bring it close to the exact diagonal
    np.testing.assert_allclose(est_flat, exact, atol=0.05 * np.abs(exact).max())
    name, idx = "output/kernel", (2, 1)
    h = 1e-2
    fd = (total_loss(model, bump(params, name, idx, h), batches) - 2 * total_loss(model, params, batches)
          + total_loss(model, bump(params, name, idx, -h), batches)) / h ** 2
    assert float(est["output"]["kernel"][idx]) == pytest.approx(fd, rel=0.1, abs=1e-3)
    scores = obd_scores(params, est)
    w = float(params["output"]["kernel"][idx])
    assert scores["output"]["kernel"][idx] == pytest.approx(w * w * float(est["output"]["kernel"][idx]) / 2)
    fisher = hessian_diagonal(model, params, {}, batches, jax.random.key(0), method="fisher")
    assert all(np.all(np.asarray(f) >= 0) for f in jax.tree.leaves(fisher))


def test_agp_density_follows_the_cubic_formula():
    cfg = PruneConfig(target_density=0.2, agp_start_step=10, agp_frequency=5, agp_updates=4)
    for t in range(0, 50):
        tt = min(max(t - 10, 0), 20)
        assert agp_density(t, cfg) == pytest.approx(1 - (0.8 + (0 - 0.8) * (1 - tt / 20) ** 3))
    assert agp_density(10, cfg) == 1.0 and agp_density(30, cfg) == pytest.approx(0.2)


def test_gradual_run_hits_the_schedule_at_every_update_and_ends_at_target(tmp_path):
    cfg = tiny(arms=["ticket"], seeds=[0], train={"steps": 60, "eval_every": 30},
               prune={"levels": 1, "schedule": "gradual", "target_density": 0.25, "agp_start_step": 10,
                      "agp_frequency": 10, "agp_updates": 4})
    store = run_lottery(cfg, tmp_path)
    agp = read_parquet(store.level_dir(1) / "agp.parquet")
    assert agp["step"].tolist() == [10, 20, 30, 40, 50]
    for _, row in agp.iterrows():
        assert row["target_density"] == pytest.approx(agp_density(int(row["step"]), cfg.prune))
        assert row["density"] == pytest.approx(row["target_density"], abs=2e-3)  # per-layer rounding
    df = load_runs(tmp_path)
    assert df[df.level == 1]["density"].unique() == pytest.approx([0.25], abs=2e-3)
    # weights pruned mid-training had Adam moments: remasking zeroed them, so they stayed exactly 0
    final, masks = (load_tree(store.level_dir(1) / f) for f in ("final.msgpack", "masks.msgpack"))
    for w, m in zip(jax.tree.leaves(final["params"]), jax.tree.leaves(masks)):
        if w.ndim == 3:  # stacked kernels [K, in, out] are pruned (biases are not)
            assert (~m).any()
        assert np.all(w[~m] == 0.0) and not np.signbit(w[~m]).any()


def test_oneshot_prunes_to_the_target_and_criteria_run(tmp_path):
    for criterion in ("saliency", "obd"):
        cfg = tiny(arms=["ticket"], seeds=[0], train={"steps": 20, "eval_every": 20}, prune={"levels": 1, "schedule": "oneshot", "target_density": 0.3,
                                           "criterion": criterion, "hessian_samples": 2})
        run_lottery(cfg, tmp_path / criterion)
        df = load_runs(tmp_path / criterion)
        assert df[df.level == 1]["density"].unique() == pytest.approx([0.3], abs=2e-3)


def test_activation_sparsity_counts_exact_zero_relu_outputs():
    model, params, batches = setup()
    x = np.concatenate([b[0] for b in batches])
    dead = jax.tree.map(lambda p: p, params)
    dead["dense_0"]["bias"] = jnp.full(5, -1e3)
    assert activation_sparsity(model, dead, {}, x) == {}  # Tiny sows nothing: only lth models report
    from lth.config import ModelConfig
    from lth.models import build_model
    mlp = build_model(ModelConfig(name="mlp", widths=(8,)), 3, (4,))
    p = mlp.init(jax.random.key(0), x)["params"]
    p["dense_0"]["bias"] = jnp.full(8, -1e3)
    assert activation_sparsity(mlp, p, {}, x) == {"dense_0": 1.0}
    p["dense_0"]["bias"] = jnp.full(8, 1e3)
    assert activation_sparsity(mlp, p, {}, x) == {"dense_0": 0.0}


def test_the_config_accepts_exactly_the_registry_entries():
    from lth.config import ConfigError
    from lth.prune.criteria import CRITERIA, register
    for name in CRITERIA:
        assert PruneConfig(criterion=name).criterion == name
    with pytest.raises(ConfigError, match="unknown criterion 'late_test_criterion'"):
        PruneConfig(criterion="late_test_criterion")
    register("late_test_criterion")(lambda params, signals: params)  # registering makes it configurable
    try:
        assert PruneConfig(criterion="late_test_criterion").criterion == "late_test_criterion"
    finally:
        del CRITERIA["late_test_criterion"]


def test_fisher_is_the_per_example_empirical_fisher():
    """``hessian = "fisher"``: mean over examples of squared per-example gradients, against a Python loop
    over single examples (batches of unequal size; chunks of 3 pad the last chunk of each batch)."""
    model, params, batches = setup()
    batches = [batches[0], (batches[1][0][:5], batches[1][1][:5])]  # 8 + 5 examples
    grad = jax.grad(lambda p, x, y: _loss(model, p, {}, x, y))
    per = [jax.tree.map(np.square, grad(params, jnp.asarray(x[i:i + 1]), jnp.asarray(y[i:i + 1])))
           for x, y in batches for i in range(len(x))]
    want = jax.tree.map(lambda *t: np.mean(t, axis=0), *per)
    got = hessian_diagonal(model, params, {}, batches, jax.random.key(0), method="fisher")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-9)
    from lth.prune.signals import empirical_fisher_diagonal

    chunked = empirical_fisher_diagonal(model, params, {}, batches, chunk=3)
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-9)

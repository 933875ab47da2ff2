"""Pruning-at-init arms as published: each method's own global ranking at the ticket's overall count
(``prune.pai_allocation``), shuffles at the method's per-layer counts, GraSP's temperature over the
weights only, and run ids that keep old stores (made with the per-layer "ticket" allocation) apart."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import ExperimentConfig, PruneConfig, stored_run_id
from lth.lottery.arms import ARMS, ArmStart
from lth.prune.criteria import CRITERIA, Signals
from lth.prune.masks import keep_global, prune_by_score
from lth.prune.signals import synflow_schedule


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(12, name="dense_0")(x))
        x = nn.relu(nn.Dense(10, name="dense_1")(x))
        return nn.Dense(3, name="output")(x)


def _setup(seed=0, d=6, n=16):
    model = MLP()
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: np.asarray(rng.normal(size=p.shape), np.float32) * 0.5,
                          model.init(jax.random.key(seed), jnp.zeros((1, d)))["params"])
    batches = [(rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 3, n)) for _ in range(2)]
    can_prune = jax.tree_util.tree_map_with_path(lambda path, p: path[-1].key == "kernel", params)
    return model, params, batches, can_prune


def _start(prune: dict, seed=0):
    """An ArmStart whose ticket is the magnitude mask at 40% of each hidden layer, 80% of the output."""
    model, params, batches, can_prune = _setup(seed)
    cfg = PruneConfig(**{"rate": 0.6, "output_rate": 0.2, "synflow_rounds": 20, **prune})
    ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    ticket = prune_by_score(jax.tree.map(np.abs, params), ones, params, cfg)
    weights = {"params": params, "batch_stats": {}}
    signals = lambda w: Signals(model, w["params"], w["batch_stats"], seed, 1, cfg, lambda: batches, (6,))  # noqa: E731
    return ArmStart(weights, ticket, can_prune, seed, 1, model, (6,), signals, {}), cfg, batches


def _layer_counts(mask, can_prune):
    return [int(np.sum(m)) for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(can_prune)) if p]


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow"])
def test_global_allocation_keeps_the_tickets_overall_count_at_the_methods_own_layer_densities(method):
    t, cfg, _ = _start({})
    assert cfg.pai_allocation == "global"  # the default: as published
    _, mask = ARMS[method](t)
    want, got = _layer_counts(t.mask, t.can_prune), _layer_counts(mask, t.can_prune)
    assert sum(got) == sum(want)  # the ticket's overall density, to the weight
    assert got != want  # the method chose its own per-layer densities
    for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(t.can_prune)):
        assert p or m.all()  # biases are never pruned
    if method != "synflow":  # one global top-k of the method's scores (synflow: iterative, below)
        sig = dataclasses.replace(t.signals(t.weights), can_prune=t.can_prune)
        top = keep_global(CRITERIA[method](t.weights["params"], sig), t.can_prune, sum(want))
        for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(top)):
            np.testing.assert_array_equal(a, b)
    # the shuffle ablation permutes within each layer at the method's own counts
    _, shuffled = ARMS[f"{method}_shuffle"](t)
    assert _layer_counts(shuffled, t.can_prune) == got
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(shuffled), jax.tree.leaves(mask)))
    # "ticket": today's behaviour, the ticket's per-layer counts
    tt, _, _ = _start({"pai_allocation": "ticket"})
    assert _layer_counts(ARMS[method](tt)[1], tt.can_prune) == want
    assert _layer_counts(ARMS[f"{method}_shuffle"](tt)[1], tt.can_prune) == want


def test_global_synflow_prunes_on_the_global_exponential_schedule():
    t, _, _ = _start({"synflow_rounds": 1})
    total = sum(_layer_counts(t.mask, t.can_prune))
    one = CRITERIA["synflow"](t.weights["params"], dataclasses.replace(t.signals(t.weights), keep=total,
                                                                       can_prune=t.can_prune))
    dense = CRITERIA["synflow"](t.weights["params"], t.signals(t.weights))  # one evaluation, no pruning
    want = keep_global(dense, t.can_prune, total)  # one round: the global top-k of the dense scores
    for s, w in zip(jax.tree.leaves(one), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.isfinite(s), w)
    many, _, _ = _start({"synflow_rounds": 30})
    many_mask = ARMS["synflow"](many)[1]
    assert sum(_layer_counts(many_mask, many.can_prune)) == total
    n = sum(int(np.size(m)) for m, p in zip(jax.tree.leaves(t.mask), jax.tree.leaves(t.can_prune)) if p)
    sched = synflow_schedule(total, n, 30)
    assert sched[-1] == total and sched[0] == int(np.floor(n * (total / n) ** (1 / 30) + 0.5))


def _grasp_reference(model, params, batches, temperature):
    """Wang et al. 2020, eq. 8 with the authors' temperature: the loss of ``logits / T``; ``g`` and ``H``
    over the kernels only; score ``S = -theta * (H g)`` (removed: the largest); returned as ``-S``."""
    kernels = {k: v["kernel"] for k, v in params.items()}
    flat, unravel = jax.flatten_util.ravel_pytree(jax.tree.map(jnp.asarray, kernels))

    def loss(v, x, y):
        p = {k: {"kernel": kern, "bias": jnp.asarray(params[k]["bias"])} for k, kern in unravel(v).items()}
        logits = model.apply({"params": p}, x) / temperature
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    grad, hess = jax.jit(jax.grad(loss)), jax.jit(jax.hessian(loss))
    g = sum(grad(flat, x, y) for x, y in batches) / len(batches)
    h = sum(hess(flat, x, y) for x, y in batches) / len(batches)
    return unravel(-(-flat * (h @ g)))


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_scores_follow_the_temperature_scaled_formula_over_weights_only(temperature):
    model, params, batches, _ = _setup(seed=1)
    cfg = PruneConfig(grasp_temperature=temperature)
    got = CRITERIA["grasp"](params, Signals(model, params, {}, 0, 1, cfg, lambda: batches, (6,)))
    want = _grasp_reference(model, params, batches, temperature)
    for layer in want:
        w = np.asarray(want[layer])
        np.testing.assert_allclose(got[layer]["kernel"], w, rtol=2e-3, atol=1e-6 * np.abs(w).max())
    if temperature == 200.0:  # T changes the ranking, not just the scale
        plain = _grasp_reference(model, params, batches, 1.0)
        a = np.concatenate([np.ravel(got[k]["kernel"]) for k in want])
        b = np.concatenate([np.ravel(plain[k]) for k in want])
        assert not np.array_equal(np.argsort(a), np.argsort(b))
    assert PruneConfig().grasp_temperature == 200.0  # the authors' T is the default


PAI = ["ticket", "snip", "grasp", "synflow", "snip_shuffle", "grasp_shuffle", "synflow_shuffle"]


def test_run_id_keeps_old_pai_stores_apart_from_the_published_allocation():
    plain = ExperimentConfig()
    old = ExperimentConfig.from_dict({"arms": PAI, "prune": {"pai_allocation": "ticket", "grasp_temperature": 1.0}})
    new = ExperimentConfig.from_dict({"arms": PAI})
    assert plain.run_id == "44136fa355b3"  # the pinned id: runs without pruning-at-init arms keep theirs
    assert old.run_id == plain.run_id  # the stored behaviour hashes as it did before the settings existed
    assert new.run_id != old.run_id  # the published allocation and temperature are a new run
    assert ExperimentConfig.from_dict({"arms": ["ticket", "snip"]}).run_id not in (old.run_id, new.run_id)
    # a store written before the settings lacks them: it reads as ticket / T = 1 and keeps its id
    stored = old.to_dict()
    for key in ("pai_allocation", "grasp_temperature"):
        del stored["prune"][key]
    assert stored_run_id({**stored, "run_id": old.run_id}) == old.run_id
    assert stored_run_id({**stored, "run_id": old.run_id}, legacy=True) == old.legacy_run_id
    assert stored_run_id(new.to_dict()) == new.run_id
    # IMP with the grasp criterion depends on the temperature, not on the allocation
    imp = ExperimentConfig.from_dict({"prune": {"criterion": "grasp"}})
    assert imp.identity_dict()["prune"] == {"criterion": "grasp", "grasp_temperature": 200.0}

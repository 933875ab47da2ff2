"""Pruning-at-initialization criteria (snip, grasp, synflow) against references computed by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import PruneConfig
from lth.prune.criteria import CRITERIA, Signals
from lth.prune.masks import keep_counts
from lth.prune.signals import synflow_schedule


class TwoLayer(nn.Module):
    """x -> relu(x W1 + b1) W2 + b2 (``relu=False``: a linear network)."""
    hidden: int = 3
    relu: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(self.hidden, name="dense_0")(x)
        h = nn.relu(h) if self.relu else h
        return nn.Dense(4, name="output")(h)


class WithNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(3, name="dense_0")(x)
        h = nn.BatchNorm(use_running_average=not train, name="bn_0")(h)
        return nn.Dense(4, name="output")(nn.relu(h))


def _setup(model=None, seed=0, n=6, d=5):
    model = model or TwoLayer()
    rng = np.random.default_rng(seed)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, d)))
    params = jax.tree.map(lambda p: np.asarray(rng.normal(size=p.shape), np.float32) * 0.7, variables["params"])
    bs = jax.tree.map(np.asarray, variables.get("batch_stats", {}))
    batches = [(rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 4, n)) for _ in range(2)]
    return model, params, bs, batches


def _signals(model, params, bs, batches, **kw):
    cfg = PruneConfig(**{k: v for k, v in kw.items() if k != "keep"})
    return Signals(model, params, bs, 0, 1, cfg, lambda: batches, (batches[0][0].shape[1],), kw.get("keep"))


def _numpy_loss(p, batches):
    """Mean cross-entropy of the linear TwoLayer, in float64 numpy (independent of JAX)."""
    total = 0.0
    for x, y in batches:
        logits = (x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]) @ p["output"]["kernel"] + p["output"]["bias"]
        logits = logits - logits.max(1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        total += -logp[np.arange(len(y)), y].mean()
    return total / len(batches)


def test_snip_equals_weight_times_finite_difference_gradient():
    model, params, bs, batches = _setup()
    got = CRITERIA["snip"](params, _signals(model, params, bs, batches, criterion="snip"))
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    eps = 1e-6
    for layer in ("dense_0", "output"):
        for leaf in ("kernel", "bias"):
            w = p64[layer][leaf]
            fd = np.zeros_like(w)
            for i in np.ndindex(w.shape):
                old = w[i]
                w[i] = old + eps
                up = _numpy_loss(p64, batches)
                w[i] = old - eps
                down = _numpy_loss(p64, batches)
                w[i] = old
                fd[i] = (up - down) / (2 * eps)
            np.testing.assert_allclose(got[layer][leaf], np.abs(w * fd), rtol=2e-3, atol=1e-6)


def test_grasp_equals_weight_times_hessian_gradient_product():
    model, params, bs, batches = _setup(TwoLayer(relu=True))
    got = CRITERIA["grasp"](params, _signals(model, params, bs, batches, criterion="grasp", grasp_temperature=1.0))
    flat, unravel = jax.flatten_util.ravel_pytree(jax.tree.map(jnp.asarray, params))

    def loss(v, x, y):
        logits = model.apply({"params": unravel(v)}, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    g = sum(jax.grad(loss)(flat, x, y) for x, y in batches) / len(batches)
    g = jax.flatten_util.ravel_pytree(  # over the weights only: the bias entries of g are 0
        jax.tree_util.tree_map_with_path(lambda p, t: t * (p[-1].key == "kernel"), unravel(g)))[0]
    h = sum(jax.hessian(loss)(flat, x, y) for x, y in batches) / len(batches)
    want = unravel(flat * (h @ g))  # -S(-w) of Wang et al. 2020: higher = keep
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6)
    # the kept weights are those with the smallest GraSP score S = -w * Hg
    counts = {"dense_0": {"kernel": 4, "bias": 3}, "output": {"kernel": 5, "bias": 4}}
    mask = keep_counts(got, counts)
    s = -np.asarray(want["dense_0"]["kernel"]).ravel()
    assert set(np.flatnonzero(mask["dense_0"]["kernel"].ravel())) == set(np.argsort(s)[:4])


def _synflow_by_hand(p):
    """SynFlow scores of TwoLayer on x = 1 with |params| (ReLU inactive: everything positive)."""
    w1, b1 = np.abs(p["dense_0"]["kernel"]), np.abs(p["dense_0"]["bias"])
    w2, b2 = np.abs(p["output"]["kernel"]), np.abs(p["output"]["bias"])
    h = w1.sum(0) + b1                  # hidden units on the all-ones input
    row = w2.sum(1)                     # dR/dh_j
    return {"dense_0": {"kernel": w1 * row[None, :], "bias": b1 * row},
            "output": {"kernel": w2 * h[:, None], "bias": b2}}


@pytest.mark.parametrize("relu", [False, True])
def test_synflow_single_evaluation_equals_hand_computed_scores(relu):
    model, params, bs, batches = _setup(TwoLayer(relu=relu))
    got = CRITERIA["synflow"](params, _signals(model, params, bs, batches, criterion="synflow"))
    want = _synflow_by_hand(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_synflow_iterative_prunes_to_the_exact_counts_and_one_round_is_oneshot():
    model, params, bs, batches = _setup(TwoLayer(hidden=6))
    keep = {"dense_0": {"kernel": 7, "bias": 6}, "output": {"kernel": 5, "bias": 4}}  # biases never pruned
    one = CRITERIA["synflow"](params, _signals(model, params, bs, batches, synflow_rounds=1, keep=keep))
    hand = _synflow_by_hand(params)
    for s, h, k in zip(jax.tree.leaves(one), jax.tree.leaves(hand), jax.tree.leaves(keep)):
        assert np.isfinite(s).sum() == k
        top = set(np.argsort(-h.ravel(), kind="stable")[:k])
        assert set(np.flatnonzero(np.isfinite(s.ravel()))) == top
    many = CRITERIA["synflow"](params, _signals(model, params, bs, batches, synflow_rounds=20, keep=keep))
    mask = keep_counts(many, keep)
    for s, m, k in zip(jax.tree.leaves(many), jax.tree.leaves(mask), jax.tree.leaves(keep)):
        assert m.sum() == k and np.isfinite(s).sum() == k and np.array_equal(np.isfinite(s), m)


def test_synflow_schedule_is_exponential_and_ends_at_the_counts():
    sched = synflow_schedule({"a": 10, "b": 50}, {"a": 1000, "b": 50}, 4)
    np.testing.assert_array_equal(sched["a"], [316, 100, 32, 10])  # 1000 * 0.01 ** (r / 4), half up
    np.testing.assert_array_equal(sched["b"], [50, 50, 50, 50])


def test_synflow_ignores_batch_norm_running_statistics():
    model, params, bs, batches = _setup(WithNorm())
    sig = _signals(model, params, bs, batches)
    base = CRITERIA["synflow"](params, sig)
    odd = jax.tree.map(lambda b: np.full(b.shape, 3.0, np.float32), bs)
    other = CRITERIA["synflow"](params, _signals(model, params, odd, batches))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other)):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(np.asarray(s) >= 0) for s in jax.tree.leaves(base))


def test_top_count_mask_follows_the_stable_rule_with_ties():
    from lth.prune.signals import top_count_mask

    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 4, size=30).astype(float)  # many ties
        m = rng.random(30) < 0.7
        k = int(rng.integers(0, m.sum() + 1))
        order = np.argsort(-np.where(m, s, -np.inf), kind="stable")
        want = np.zeros(30, bool)
        want[order[:k]] = True
        np.testing.assert_array_equal(top_count_mask(s, m, k), want)

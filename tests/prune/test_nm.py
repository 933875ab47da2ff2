"""N:M semi-structured sparsity: exactly k of every m per level, IMP decays k to n, compact format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import ConfigError, ExperimentConfig, ModelConfig, PruneConfig
from lth.models import build_model
from lth.prune.nm import (group_counts, group_schedule, groupable, keep_per_group, nm_bytes, nm_compress,
                    nm_decompress, nm_prune)
from lth.prune.structured import structured_prune


def init(cfg, shape):
    model = build_model(cfg, 10, shape)
    return model, jax.tree.map(np.asarray, model.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"])


def ones(params):
    return jax.tree.map(lambda p: np.ones(p.shape, bool), params)


def test_keep_per_group_keeps_the_n_largest_of_every_group():
    w = np.array([[1, -5], [4, 0.5], [-3, 2], [2, 9], [0, 1], [7, 1], [-1, 1], [6, 1]], np.float32)  # [8, 2]
    mask = keep_per_group(w, np.ones(w.shape, bool), 4, 2)
    assert mask[:, 0].tolist() == [0, 1, 1, 0, 0, 1, 0, 1]
    # column 1, group 2: four equal |w| = 1: the earlier positions win
    assert mask[:, 1].tolist() == [1, 0, 0, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("n, m, rate", [(2, 4, 0.2), (1, 4, 0.5), (2, 8, 0.2)])
def test_imp_levels_reach_exactly_n_of_m_in_every_group(n, m, rate):
    cfg = ModelConfig(name="conv2", width=0.25)  # conv_0 has fan-in 27: not groupable, stays dense
    model, params = init(cfg, (8, 8, 3))
    pc = PruneConfig(granularity="n:m", n=n, m=m, rate=rate, output_rate=rate / 2)
    schedule = group_schedule(m, n, rate, 6)
    assert schedule[-1] == n and all(a >= b for a, b in zip(schedule, schedule[1:]))
    mask = ones(params)
    for level in range(1, 7):
        new = structured_prune(params, mask, pc, model)
        for name, leaves in new.items():
            k, prev = leaves["kernel"], mask[name]["kernel"]
            assert not (k & ~prev).any()  # nested: never regrows
            assert leaves["bias"].all()
            if not groupable(k.shape, m):
                assert k.all()
                continue
            counts = group_counts(k, m)
            rate_l = rate / 2 if name == "output" else rate
            assert (counts == group_schedule(m, n, rate_l, level)[-1]).all()  # exactly k in every group
        mask = new
    # the target is reached at the last level in every grouped layer, output included
    assert all((group_counts(v["kernel"], m) == n).all() for v in mask.values() if groupable(v["kernel"].shape, m))


def test_excluded_layers_stay_dense_and_kept_weights_are_the_largest():
    _, params = init(ModelConfig(name="mlp", widths=(16,)), (8,))
    pc = PruneConfig(granularity="n:m", n=2, m=4, rate=0.5, exclude=("output",))
    mask = nm_prune(params, ones(params), pc)
    assert mask["output"]["kernel"].all()
    k, w = mask["dense_0"]["kernel"], np.abs(params["dense_0"]["kernel"])
    g, gw = k.reshape(2, 4, 16), w.reshape(2, 4, 16)
    assert (np.where(g, gw, np.inf).min(1) >= np.where(g, -np.inf, gw).max(1)).all()


def test_compact_format_round_trips_and_counts_bytes():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3, 8, 5)).astype(np.float32)  # fan-in 72 = 18 groups of 4
    w = w * keep_per_group(w, np.ones(w.shape, bool), 4, 2)
    w.reshape(-1, 5)[0:4, 0] = [0, 0, 0, 1.5]  # a group with fewer than n non-zeros
    values, index = nm_compress(w, 2, 4)
    assert values.shape == index.shape == (18, 2, 5) and index.max() < 4
    np.testing.assert_array_equal(nm_decompress(values, index, 4, w.shape), w)
    # 180 values: fp32 720 B + 2-bit indices 45 B
    assert nm_bytes(w.shape, 2, 4, 32) == 720 + 45
    with pytest.raises(ValueError, match="more than 1 of 4"):
        nm_compress(w, 1, 4)


def test_config_fields_default_keep_run_ids_and_are_checked():
    base = ExperimentConfig()
    assert base.replace(prune=PruneConfig(n=2, m=4)).run_id == base.run_id
    nm = ExperimentConfig.from_dict({"prune": {"granularity": "n:m", "n": 1, "m": 8}})
    assert nm.run_id != base.run_id and nm.prune.m == 8
    with pytest.raises(ConfigError, match="expected 1 <= n < m"):
        ExperimentConfig.from_dict({"prune": {"granularity": "n:m", "n": 4, "m": 4}})
    with pytest.raises(ConfigError, match="criterion"):
        ExperimentConfig.from_dict({"prune": {"granularity": "n:m", "criterion": "saliency"}})
    with pytest.raises(ConfigError, match="prune.m = 1"):
        ExperimentConfig.from_dict({"prune": {"m": 1}})


def test_nm_imp_run_stores_2_of_4_masks(tmp_path):
    from lth.lottery import run_lottery
    from lth.store import load_tree
    from lth.train import unstack
    from helpers import tiny
    cfg = tiny(arms=["ticket"], seeds=[0], train={"steps": 20, "eval_every": 20},
               prune={"levels": 2, "granularity": "n:m", "rate": 0.2})
    store = run_lottery(cfg, tmp_path)
    for level, k in ((1, 3), (2, 2)):
        m = unstack(load_tree(store.level_dir(level) / "masks.msgpack"), 0)
        for name in ("dense_0", "dense_1", "output"):
            assert (group_counts(m[name]["kernel"], 4) == k).all()
        w = unstack(load_tree(store.level_dir(level) / "final.msgpack")["params"], 0)
        assert not np.any(np.asarray(w["dense_0"]["kernel"])[~np.asarray(m["dense_0"]["kernel"], bool)])

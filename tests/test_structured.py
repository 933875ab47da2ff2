"""Structured pruning: whole neurons/filters, the next layer's inputs follow, compact == masked."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import ModelConfig, PruneConfig
from lth.models import build_model
from lth.structured import compact, is_structured, layer_order, structured_prune
from lth.train import apply_mask


def init(cfg, shape):
    model = build_model(cfg, 10, shape)
    params = model.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
    params = jax.tree.map(np.asarray, params)
    # non-zero biases so that a forgotten bias would change the outputs
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if p[-1].key == "bias" else x, params)
    return model, params


def ones(params):
    return jax.tree.map(lambda p: np.ones(p.shape, bool), params)


CASES = [
    (ModelConfig(name="mlp", widths=(20, 12)), (16,), "neuron"),
    (ModelConfig(name="conv2", width=0.1), (8, 8, 3), "filter"),
    (ModelConfig(name="conv4", width=0.1), (8, 8, 3), "neuron"),
]


@pytest.mark.parametrize("cfg, shape, granularity", CASES)
def test_structured_masks_remove_whole_units_and_their_outputs(cfg, shape, granularity):
    model, params = init(cfg, shape)
    pc = PruneConfig(rate=0.5, granularity=granularity)
    mask = ones(params)
    for _ in range(2):
        mask = structured_prune(params, mask, pc, cfg.name)
    order = layer_order(params)
    assert is_structured(mask, order)
    pruned_layers = [n for n in order[:-1] if n.startswith("conv" if granularity == "filter" else "dense")]
    for i, name in enumerate(order[:-1]):
        k = mask[name]["kernel"].reshape(-1, mask[name]["kernel"].shape[-1])
        alive = k.any(0)
        if name in pruned_layers:
            n = k.shape[-1]
            for _ in range(2):  # two levels, each removing round-half-up(50%) of the surviving units
                n -= int(np.floor(0.5 * n + 0.5))
            assert alive.sum() == n
            assert np.array_equal(mask[name]["bias"], alive)
            nxt = mask[order[i + 1]]["kernel"]
            if nxt.ndim == 4:
                assert not nxt[:, :, ~alive, :].any()
            elif name.startswith("conv"):
                assert not nxt[np.isin(np.arange(nxt.shape[0]) % len(alive), np.flatnonzero(~alive))].any()
            else:
                assert not nxt[~alive].any()
        else:
            assert alive.all()


@pytest.mark.parametrize("cfg, shape, granularity", CASES)
def test_compact_network_equals_the_masked_network(cfg, shape, granularity):
    model, params = init(cfg, shape)
    mask = structured_prune(params, ones(params), PruneConfig(rate=0.6, granularity=granularity), cfg.name)
    small_model, small_params = compact(params, mask, cfg, 10, shape)
    x = np.random.default_rng(0).normal(size=(7, *shape)).astype(np.float32)
    masked_out = model.apply({"params": apply_mask(params, mask)}, x)
    small_out = small_model.apply({"params": small_params}, x)
    np.testing.assert_allclose(small_out, masked_out, rtol=1e-5, atol=1e-5)
    n_small = sum(v.size for v in jax.tree.leaves(small_params))
    n_big = sum(v.size for v in jax.tree.leaves(params))
    assert n_small < n_big


def test_structured_rejects_unsupported_models():
    model, params = init(ModelConfig(name="mlp", widths=(4,)), (3,))
    with pytest.raises(ValueError, match="supports mlp"):
        structured_prune(params, ones(params), PruneConfig(granularity="filter"), "resnet20")


def test_neuron_imp_run_and_compact_cli(tmp_path, capsys):
    from lth.cli import main
    from lth.lottery import run_lottery
    from lth.store import load_tree
    from lth.train import unstack
    from test_lottery import tiny
    cfg = tiny(arms=["ticket"], seeds=[0], train={"steps": 20, "eval_every": 20},
               prune={"levels": 2, "granularity": "neuron", "rate": 0.5})
    store = run_lottery(cfg, tmp_path)
    for level in (1, 2):
        masks = load_tree(store.level_dir(level) / "masks.msgpack")
        m = unstack(masks, 0)
        assert is_structured(m, layer_order(m))
    assert main(["compact", str(store.path), "--level", "2", "--batch", "100"]) == 0
    out = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert float(out["max_abs_diff".rjust(20)]) < 1e-4
    # 24 -> 12 -> 6 and 16 -> 8 -> 4 units: 40*6+6 + 6*4+4 + 4*10+10
    assert int(out["params_compact".rjust(20)]) == 40 * 6 + 6 + 6 * 4 + 4 + 4 * 10 + 10

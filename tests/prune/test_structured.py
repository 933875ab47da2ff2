"""Structured pruning: whole neurons/filters, the next layer's inputs follow, compact == masked;
whole residual blocks of resnet20 become the identity."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import ModelConfig, PruneConfig
from lth.models import build_model
from lth.prune.structured import (compact, droppable_blocks, drop_block, dropped_blocks, is_structured, layer_order,
                            residual_blocks, structured_prune)
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
        mask = structured_prune(params, mask, pc, model)
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
    mask = structured_prune(params, ones(params), PruneConfig(rate=0.6, granularity=granularity), model)
    small_model, small_params = compact(params, mask, cfg, 10, shape)
    x = np.random.default_rng(0).normal(size=(7, *shape)).astype(np.float32)
    masked_out = model.apply({"params": apply_mask(params, mask)}, x)
    small_out = small_model.apply({"params": small_params}, x)
    np.testing.assert_allclose(small_out, masked_out, rtol=1e-5, atol=1e-5)
    n_small = sum(v.size for v in jax.tree.leaves(small_params))
    n_big = sum(v.size for v in jax.tree.leaves(params))
    assert n_small < n_big


def test_structured_rejects_what_the_model_does_not_declare():
    model, params = init(ModelConfig(name="mlp", widths=(4,)), (3,))
    with pytest.raises(ValueError, match="'layer' is not supported by MLP; it supports weight, neuron, n:m"):
        structured_prune(params, ones(params), PruneConfig(granularity="layer"), model)
    resnet = build_model(ModelConfig(name="resnet20", width=0.25), 10, (8, 8, 3))
    with pytest.raises(ValueError, match="'filter' is not supported by ResNet; it supports weight, layer, n:m"):
        structured_prune(params, ones(params), PruneConfig(granularity="filter"), resnet)


def test_neuron_imp_run_and_compact_cli(tmp_path, capsys):
    from lth.cli import main
    from lth.lottery import run_lottery
    from lth.store import load_tree
    from lth.train import unstack
    from helpers import tiny
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

    # a compact network that computes something else (one live weight changed) is refused, exit 1
    import lth.prune.structured as structured
    real = structured.compact

    def off_by_one_weight(*a, **k):
        small_model, small_params = real(*a, **k)
        first = jax.tree.leaves(small_params)[0]
        leaf_path = jax.tree_util.tree_leaves_with_path(small_params)[0][0]
        bad = jax.tree_util.tree_map_with_path(
            lambda p, v: np.asarray(v) + (np.float32(0.5) * (np.arange(v.size) == 0).reshape(v.shape)
                                          if p == leaf_path else 0), small_params)
        assert np.asarray(jax.tree.leaves(bad)[0]).ravel()[0] == np.asarray(first).ravel()[0] + np.float32(0.5)
        return small_model, bad

    structured.compact = off_by_one_weight
    try:
        assert main(["compact", str(store.path), "--level", "2", "--batch", "100"]) == 1
    finally:
        structured.compact = real
    err = capsys.readouterr().err
    assert "does not compute the masked network" in err and "tolerance" in err


# ---------------------------------------------------------------------------- residual blocks (layer)

RESNET = ModelConfig(name="resnet20", width=0.25)  # stages of 4, 8, 16 channels
IMAGE = (8, 8, 3)


@pytest.fixture(scope="module")
def resnet():
    """(model, params, batch_stats) of a tiny resnet20 with non-trivial BN params and running stats."""
    from lth.train import init_variables
    model = build_model(RESNET, 10, IMAGE)
    params, bs = jax.tree.map(np.asarray, jax.jit(lambda k: init_variables(model, k, IMAGE))(jax.random.key(0)))
    rng = np.random.default_rng(0)

    def bn(path, x):  # non-zero BN shifts and scales, running stats far from (0, 1)
        name = path[-1].key
        if name in ("bias", "mean"):
            return x + rng.normal(size=x.shape).astype(x.dtype)
        if name in ("scale", "var"):
            return x * rng.uniform(0.5, 2.0, size=x.shape).astype(x.dtype)
        return x

    return model, jax.tree_util.tree_map_with_path(bn, params), jax.tree_util.tree_map_with_path(bn, bs)


def block_io(model, params, bs, x, train):
    """{block: (input, output)} of every residual block, read from the sown post-ReLU activations."""
    cols = ["activations", "batch_stats"] if train else ["activations"]
    apply = jax.jit(lambda p, b, x: model.apply({"params": p, "batch_stats": b}, x, train=train, mutable=cols))
    logits, out = apply(params, bs, x)
    acts = out["activations"]
    prev, io = np.asarray(acts["conv_0_relu"][0]), {}
    for name in residual_blocks(params):
        y = np.asarray(acts[name]["out_relu"][0])
        io[name] = (prev, y)
        prev = y
    return io, np.asarray(logits)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_dropped_block_computes_the_identity(resnet, train):
    model, params, bs = resnet
    mask = ones(params)
    for name in ("stage1_block1", "stage3_block2"):
        drop_block(mask, name)
    x = np.random.default_rng(1).normal(size=(4, *IMAGE)).astype(np.float32)
    io, logits = block_io(model, apply_mask(params, mask), bs, x, train)
    for name in ("stage1_block1", "stage3_block2"):
        x_in, y = io[name]
        assert np.array_equal(y, x_in) and np.abs(x_in).sum() > 0
    for name in ("stage1_block2", "stage3_block1"):  # kept blocks still compute something
        assert not np.allclose(io[name][1], io[name][0])
    dense, _ = block_io(model, params, bs, x, train)  # unmasked: the same block is not the identity
    assert not np.allclose(dense["stage1_block1"][1], dense["stage1_block1"][0])
    # the logits are those of the network without the last block: the head reads stage3_block1's output
    pooled = io["stage3_block1"][1].mean(axis=(1, 2))
    np.testing.assert_allclose(logits, pooled @ params["output"]["kernel"] + params["output"]["bias"],
                               rtol=1e-5, atol=1e-5)


def test_layer_mask_removes_whole_identity_blocks_only(resnet):
    model, params, _ = resnet
    assert droppable_blocks(params) == ["stage1_block0", "stage1_block1", "stage1_block2", "stage2_block1",
                                        "stage2_block2", "stage3_block1", "stage3_block2"]
    pc = PruneConfig(rate=0.5, granularity="layer")
    mask, counts = ones(params), []
    for _ in range(4):  # 7 droppable blocks: drop round-half-up(50%) of the survivors -> 4, 2, 1, 0
        new = structured_prune(params, mask, pc, model)
        assert set(dropped_blocks(mask)) <= set(dropped_blocks(new))  # nested: dropped blocks stay dropped
        mask = new
        counts.append(len(dropped_blocks(mask)))
    assert counts == [4, 6, 7, 7]
    pc = PruneConfig(rate=0.2, granularity="layer")  # 7 -> 6 -> 5 -> 4 -> 3 -> 2 -> 2 (round(0.4) = 0)
    mask, counts = ones(params), []
    for _ in range(6):
        mask = structured_prune(params, mask, pc, model)
        counts.append(len(dropped_blocks(mask)))
    assert counts == [1, 2, 3, 4, 5, 5]
    mask = structured_prune(params, ones(params), PruneConfig(rate=0.5, granularity="layer"), model)
    dropped = dropped_blocks(mask)
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    for path, m in flat:  # every leaf of a dropped block is False (BN scale/bias too), all else untouched
        top = path[0].key
        assert m.dtype == bool
        assert (not m.any()) if top in dropped else m.all(), jax.tree_util.keystr(path)
    assert {p[-1].key for p, _ in flat if p[0].key in dropped} == {"kernel", "scale", "bias"}
    kept = structured_prune(params, ones(params), PruneConfig(rate=0.5, granularity="layer",
                                                              exclude=tuple(dropped)), model)
    assert not set(dropped_blocks(kept)) & set(dropped)  # excluded blocks are never dropped
    with pytest.raises(ValueError, match="projection shortcut"):
        drop_block(ones(params), "stage2_block0")


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_layer_ranking_drops_the_block_with_the_smallest_batch_norm_scale(resnet, norm):
    model, params, _ = resnet
    params = jax.tree.map(np.array, params)
    for name in droppable_blocks(params):
        params[name]["bn_1"]["scale"][...] = 1.0
    params["stage2_block1"]["bn_1"]["scale"][...] = 0.9
    # conv weights do not rank blocks: the branch's batch norm divides their size out
    for conv in ("conv_0", "conv_1"):
        params["stage2_block1"][conv]["kernel"][...] *= 100.0
        params["stage1_block1"][conv]["kernel"][...] *= 0.01
    pc = PruneConfig(rate=0.1, granularity="layer", structure_norm=norm)  # round(0.7) = 1 block
    assert dropped_blocks(structured_prune(params, ones(params), pc, model)) == ["stage2_block1"]
    # masked scale entries do not count: stage1_block2's surviving scales are small, its masked ones huge
    mask = ones(params)
    g = params["stage1_block2"]["bn_1"]["scale"]
    g[:2], g[2:] = 1e6, 0.5
    mask["stage1_block2"]["bn_1"]["scale"][:2] = False
    assert dropped_blocks(structured_prune(params, mask, pc, model)) == ["stage1_block2"]
    # l1 and l2 disagree: scales alternating 1.8 and 0 have mean |gamma| 0.9 but RMS 1.27
    params["stage1_block2"]["bn_1"]["scale"][...] = np.where(np.arange(g.size) % 2, 1.8, 0.0)
    params["stage2_block1"]["bn_1"]["scale"][...] = 0.95
    lowest = {"l1": "stage1_block2", "l2": "stage2_block1"}[norm]
    assert dropped_blocks(structured_prune(params, ones(params), pc, model)) == [lowest]


def test_dropped_blocks_stay_exactly_zero_through_training(resnet):
    from types import SimpleNamespace

    from lth.config import TrainConfig
    from lth.train import Engine, stack, unstack
    model, params, bs = resnet
    rng = np.random.default_rng(0)
    x = rng.normal(size=(56, *IMAGE)).astype(np.float32)
    y = rng.integers(0, 10, size=56).astype(np.int32)
    # no val/test split: the engine then compiles no evaluation program (compile time is this test's cost)
    data = SimpleNamespace(x_train=x[:40], y_train=y[:40], x_val=x[:0], y_val=y[:0], x_test=x[:0],
                           y_test=y[:0], num_classes=10, input_shape=IMAGE)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, batch_size=8, steps=4,
                      eval_every=4)
    engine = Engine(model, data, cfg)
    mask = ones(params)
    drop_block(mask, "stage2_block1")
    state = engine.init(stack([params]), stack([bs]), stack([mask]), jax.random.key(0)[None])
    result = engine.run(state, [0])
    trained, trained_bs = unstack(jax.device_get(result.state.params), 0), unstack(jax.device_get(result.state.batch_stats), 0)
    for leaf in jax.tree.leaves(trained["stage2_block1"]):
        assert np.all(leaf == 0.0) and not np.any(np.signbit(leaf))
    for key in ("scale", "bias"):  # the kept blocks' BN params did train
        assert not np.allclose(trained["stage2_block2"]["bn_1"][key], params["stage2_block2"]["bn_1"][key])
    # in eval mode, with the running stats training left (and not masked), the block is still the identity
    x_in, y_out = block_io(model, trained, trained_bs, x[40:], False)[0]["stage2_block1"]
    assert np.array_equal(y_out, x_in) and np.abs(x_in).sum() > 0
    assert np.isfinite(result.records[-1]["loss"])


def test_granularity_is_checked_against_what_the_model_declares():
    from lth.config import ConfigError, ExperimentConfig
    from lth.prune.structured import check_granularity
    mlp, mlp_params = init(ModelConfig(name="mlp", widths=(4,)), (3,))
    with pytest.raises(ConfigError) as e:
        check_granularity(PruneConfig(granularity="layer"), mlp, mlp_params, "mlp")
    msg = str(e.value)
    assert "prune.granularity = 'layer'" in msg and "model.name = 'mlp'" in msg and "residual blocks" in msg
    assert "'weight', 'neuron', 'n:m'" in msg  # no convolution: no filters
    resnet = build_model(RESNET, 10, IMAGE)
    shapes = jax.eval_shape(lambda: resnet.init(jax.random.key(0), jnp.zeros((1, *IMAGE))))["params"]
    check_granularity(PruneConfig(granularity="layer"), resnet, shapes, "resnet20")
    with pytest.raises(ConfigError, match="with resnet20 use prune.granularity = 'weight', 'layer', 'n:m'"):
        check_granularity(PruneConfig(granularity="neuron"), resnet, shapes, "resnet20")
    vgg = build_model(ModelConfig(name="vgg11", width=1 / 16), 10, (16, 16, 3))
    with pytest.raises(ConfigError, match="no hidden dense layer"):
        check_granularity(PruneConfig(granularity="neuron"), vgg, {}, "vgg11")
    # a declaration that does not fit the params names the layer
    with pytest.raises(ConfigError, match="layer 'extra' has a kernel but is not in the model's chain"):
        check_granularity(PruneConfig(granularity="neuron"), mlp, {**mlp_params, "extra": {"kernel": np.ones((2, 2))}},
                          "mlp")
    with pytest.raises(ConfigError, match=r"prune.granularity = 'layer' is not allowed with prune.schedule = "
                                          r"'gradual' .*use prune.granularity = 'weight'"):
        ExperimentConfig.from_dict({"model": {"name": "resnet20"},
                                    "prune": {"granularity": "layer", "schedule": "gradual"}}, "exp.toml")
    with pytest.raises(ConfigError, match="random_prune and shuffle"):
        ExperimentConfig.from_dict({"model": {"name": "resnet20"}, "arms": ["ticket", "random_prune"],
                                    "prune": {"granularity": "layer"}})


def test_lottery_refuses_a_granularity_the_model_lacks_before_training(tmp_path):
    from lth.config import ConfigError
    from lth.lottery import run_lottery
    from helpers import tiny
    with pytest.raises(ConfigError, match="prune.granularity = 'layer' is not allowed with model.name = 'mlp'"):
        run_lottery(tiny(arms=["ticket"], prune={"levels": 1, "granularity": "layer"}), tmp_path)
    assert not any(tmp_path.rglob("level_000"))


def test_vgg_filters_take_their_batch_norm_entries_and_next_inputs_with_them():
    from lth.train import init_variables
    cfg, shape = ModelConfig(name="vgg11", width=1 / 16), (16, 16, 3)  # 4, 8, 16, 16, 32, 32, 32, 32 filters
    model = build_model(cfg, 10, shape)
    params, bs = jax.tree.map(np.asarray, jax.jit(lambda k: init_variables(model, k, shape))(jax.random.key(0)))
    params = jax.tree_util.tree_map_with_path(  # BN shifts > 0: a channel whose BN shift is left on stays alive
        lambda p, x: x + 0.5 if p[-1].key == "bias" else x, params)
    mask = structured_prune(params, ones(params), PruneConfig(rate=0.5, granularity="filter"), model)
    order = layer_order(params)
    assert order == [f"conv_{i}" for i in range(8)] + ["output"]
    assert is_structured(mask, order)
    removed = {}
    for i, name in enumerate(order[:-1]):
        alive = mask[name]["kernel"].reshape(-1, mask[name]["kernel"].shape[-1]).any(0)
        n = len(alive)
        assert alive.sum() == n - int(np.floor(0.5 * n + 0.5))
        assert np.array_equal(mask[f"bn_{i}"]["scale"], alive) and np.array_equal(mask[f"bn_{i}"]["bias"], alive)
        nxt = mask[order[i + 1]]["kernel"]
        assert not (nxt[:, :, ~alive, :] if nxt.ndim == 4 else nxt[~alive]).any()
        removed[f"bn_{i}"] = ~alive
    broken = jax.tree.map(np.array, mask)
    broken["bn_3"]["bias"][:] = True
    assert not is_structured(broken, order)
    # removed channels are exactly 0 after BN + ReLU in train and eval mode, and in eval mode the logits
    # do not depend on the removed channels' running statistics
    x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
    other = {bn: {k: np.where(removed[bn], v * 5.0 + 3.0, v) for k, v in stats.items()} for bn, stats in bs.items()}
    masked = apply_mask(params, mask)
    for train in (False, True):
        fn = jax.jit(lambda p, b: model.apply({"params": p, "batch_stats": b}, x, train=train,
                                              mutable=["activations", "batch_stats"]))
        logits, out = fn(masked, bs)
        for i in range(8):
            a = np.asarray(out["activations"][f"conv_{i}_relu"][0])
            assert not a[..., removed[f"bn_{i}"]].any() and a[..., ~removed[f"bn_{i}"]].any()
        if not train:
            np.testing.assert_array_equal(logits, fn(masked, other)[0])


def test_a_granularity_that_would_prune_nothing_is_an_error_before_any_work():
    """n:m with an m that divides no pruned kernel's fan-in, filters of a model without convolutions,
    neurons of excluded layers: every level would train at density 1.0."""
    from lth.config import ConfigError
    from lth.prune.structured import check_granularity
    mlp, params = init(ModelConfig(name="mlp", widths=(24, 16)), (40,))  # fan-ins 40, 24, 16
    check_granularity(PruneConfig(granularity="n:m", m=4, levels=2), mlp, params, "mlp")
    with pytest.raises(ConfigError, match=r"prune.granularity = 'n:m' with prune.m = 7 prunes nothing in model.name = "
                                          r"'mlp'.*fan-ins: dense_0 40, dense_1 24, output 16"):
        check_granularity(PruneConfig(granularity="n:m", n=2, m=7, levels=2), mlp, params, "mlp")
    # m = 5 divides only dense_0's fan-in: excluding it leaves nothing
    with pytest.raises(ConfigError, match=r"fan-ins: dense_1 24, output 16\)"):
        check_granularity(PruneConfig(granularity="n:m", m=5, levels=1, exclude=("dense_0",)), mlp, params, "mlp")
    with pytest.raises(ConfigError, match=r"prune.granularity = 'filter' is not allowed with model.name = 'mlp' "
                                          r"\(it has no convolution\); with mlp use prune.granularity = 'weight', "
                                          r"'neuron', 'n:m'"):
        check_granularity(PruneConfig(granularity="filter", levels=1), mlp, params, "mlp")
    with pytest.raises(ConfigError, match=r"'neuron' prunes nothing in model.name = 'mlp': its hidden dense layers "
                                          r"\(dense_0, dense_1\) are all in prune.exclude or have rate 0"):
        check_granularity(PruneConfig(granularity="neuron", levels=1, exclude=("dense_0",), rates={"dense_1": 0.0}),
                          mlp, params, "mlp")
    conv, conv_params = init(ModelConfig(name="conv2", width=0.1), (8, 8, 3))
    check_granularity(PruneConfig(granularity="filter", levels=1), conv, conv_params, "conv2")
    # no level prunes: the dense run is what was asked for
    check_granularity(PruneConfig(granularity="n:m", m=7, levels=0), mlp, params, "mlp")

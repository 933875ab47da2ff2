"""One-shot arms (oneshot_magnitude, wanda, sparsegpt and their *_ft): the trained dense network pruned
layer after layer at the ticket's (or uniform) per-layer counts, evaluated as pruned or fine-tuned with
the mask kept; Wanda's mask equals the layer function on inputs computed here; SparseGPT's update
lowers the layer error; a population prunes as its members alone."""

import dataclasses

import flax.linen as nn

import jax
import numpy as np
import pandas as pd
import pytest

from helpers import tiny
from lth.config import ConfigError
from lth.data import load_dataset
from lth.lottery.arms import ArmStart, oneshot_targets
from lth.lottery.runner import Lottery, population_key
from lth.models import build_model
from lth.config import ModelConfig
from lth.prune.oneshot import reconstruction_error, wanda
from lth.prune.oneshot_net import conv_patches, prune_population, unsupported_layers
from lth.store import load_tree
from lth.train import DataOrder, unstack

ARMS = ["oneshot_magnitude", "wanda", "sparsegpt", "oneshot_magnitude_ft", "wanda_ft", "sparsegpt_ft"]
CALIB = 2
FT_STEPS = 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("oneshot")
    cfg = tiny(seeds=[0], arms=["ticket", *ARMS],
               prune={"levels": 2, "calib_batches": CALIB, "oneshot_finetune_steps": FT_STEPS})
    Lottery(cfg, out, progress=False).run()
    return cfg, out / cfg.run_id


def member(run_dir, level, arm, seed=0):
    members = pd.read_json(run_dir / f"level_{level:03d}" / "members.json")
    k = int(members.index[(members.arm == arm) & (members.seed == seed)][0])
    d = run_dir / f"level_{level:03d}"
    return unstack(load_tree(d / "masks.msgpack"), k), unstack(load_tree(d / "final.msgpack")["params"], k)


KERNELS = ("dense_0", "dense_1", "output")


def test_each_arm_keeps_its_allocations_exact_per_layer_counts(run):
    cfg, d = run
    for level in (1, 2):
        ticket, _ = member(d, level, "ticket")
        for arm in ARMS:
            mask, _ = member(d, level, arm)
            for layer in KERNELS:
                t, m = ticket[layer]["kernel"], mask[layer]["kernel"]
                if arm.startswith("wanda"):  # per output row (the paper): every row keeps round(density * in)
                    per_row = int(round(t.sum() / t.size * t.shape[0]))
                    assert (m.sum(axis=0) == per_row).all(), (level, arm, layer)
                else:
                    assert m.sum() == t.sum(), (level, arm, layer)
                assert mask[layer]["bias"].all()


def test_pruned_weights_are_exactly_zero_and_only_the_ft_arms_train(run):
    cfg, d = run
    m = pd.read_parquet(d / "level_001" / "metrics.parquet")
    for arm in ARMS:
        mask, final = member(d, 1, arm)
        for layer in KERNELS:
            assert (final[layer]["kernel"][~mask[layer]["kernel"]] == 0).all(), (arm, layer)
        steps = set(m[m.arm == arm]["step"])
        assert steps == ({FT_STEPS} if arm.endswith("_ft") else {0}), arm
        if arm.endswith("_ft"):  # fine-tuned from the plain arm's pruned network, same mask
            plain_mask, plain = member(d, 1, arm[:-3])
            assert all((plain_mask[l]["kernel"] == mask[l]["kernel"]).all() for l in KERNELS)
            assert not np.allclose(plain["dense_0"]["kernel"], final["dense_0"]["kernel"])


def _calibration(cfg):
    data = load_dataset(cfg.data)
    idx = DataOrder(len(data.x_train), cfg.train.batch_size).indices(0, 0, CALIB).reshape(-1)
    return np.asarray(data.x_train)[idx].reshape(len(idx), -1)


def test_wanda_masks_equal_the_layer_function_on_the_pruned_networks_inputs(run):
    cfg, d = run
    _, dense = member(d, 0, "ticket")
    ticket, _ = member(d, 1, "ticket")
    mask, final = member(d, 1, "wanda")
    x = _calibration(cfg)
    w0 = dense["dense_0"]["kernel"]
    _, m0 = wanda(w0.T, x, density=ticket["dense_0"]["kernel"].mean())
    np.testing.assert_array_equal(np.asarray(m0).T > 0, mask["dense_0"]["kernel"])
    # the second layer sees the first layer already pruned
    h = np.maximum(x @ (w0 * mask["dense_0"]["kernel"]) + dense["dense_0"]["bias"], 0)
    _, m1 = wanda(dense["dense_1"]["kernel"].T, h, density=ticket["dense_1"]["kernel"].mean())
    np.testing.assert_array_equal(np.asarray(m1).T > 0, mask["dense_1"]["kernel"])
    h_dense = np.maximum(x @ w0 + dense["dense_0"]["bias"], 0)
    _, m1_dense = wanda(dense["dense_1"]["kernel"].T, h_dense, density=ticket["dense_1"]["kernel"].mean())
    assert not np.array_equal(np.asarray(m1_dense), np.asarray(m1))


def test_sparsegpt_first_layer_reconstructs_better_than_magnitude(run):
    cfg, d = run
    _, dense = member(d, 0, "ticket")
    mask, final = member(d, 2, "sparsegpt")
    mag_mask, mag = member(d, 2, "oneshot_magnitude")
    x = _calibration(cfg)
    w = dense["dense_0"]["kernel"].T
    err = reconstruction_error(w, final["dense_0"]["kernel"].T, x)
    assert err < reconstruction_error(w, (dense["dense_0"]["kernel"] * mask["dense_0"]["kernel"]).T, x)
    assert err < reconstruction_error(w, mag["dense_0"]["kernel"].T, x)
    assert mask["dense_0"]["kernel"].mean() == pytest.approx(mag_mask["dense_0"]["kernel"].mean())


def _model_and_params():
    model = build_model(ModelConfig(name="mlp", widths=(12, 8)), 10, (20,))
    params = [jax.tree.map(np.asarray, model.init(jax.random.key(s), np.zeros((1, 20)))["params"]) for s in (0, 1)]
    xs = [np.random.default_rng(s).normal(size=(64, 20)).astype(np.float32) for s in (0, 1)]
    return model, params, xs


def test_a_population_prunes_as_its_members_alone_and_nm_counts_are_exact():
    model, params, xs = _model_and_params()
    t = {("dense_0", "kernel"): 0.5, ("dense_1", "kernel"): (2, 4), ("output", "kernel"): (1, 4)}
    methods = ["sparsegpt", "wanda", "magnitude", "sparsegpt"]
    together = prune_population(model, methods, params * 2, [{}] * 4, xs * 2, [t] * 4)
    for k in range(4):
        alone = prune_population(model, [methods[k]], [params[k % 2]], [{}], [xs[k % 2]], [t])
        for part in (0, 1):  # weights, masks
            for a, b in zip(jax.tree.leaves(alone[part][0]), jax.tree.leaves(together[part][k])):
                np.testing.assert_allclose(a, b, atol=1e-5)
        mask = together[1][k]
        assert mask["dense_0"]["kernel"].sum() == 120  # half of 20 x 12
        if methods[k] == "wanda":  # per output row: each keeps 10 of its 20 inputs
            assert (mask["dense_0"]["kernel"].sum(axis=0) == 10).all()
        groups = mask["dense_1"]["kernel"].reshape(3, 4, 8).sum(axis=1)
        assert (groups == 2).all() and (mask["output"]["kernel"].reshape(2, 4, 10).sum(axis=1) == 1).all()


def test_uniform_allocation_gives_every_layer_the_tickets_overall_density():
    cfg = tiny(prune={"oneshot_allocation": "uniform"})
    model, params, _ = _model_and_params()
    can = jax.tree.map(lambda p: p.ndim == 2, params[0])
    mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params[0])
    mask["dense_0"]["kernel"][:, :6] = False  # 120 of 240 kept, dense_1 96, output 80: 296 of 416
    sig = type("S", (), {"cfg": cfg.prune})
    t = ArmStart({"params": params[0]}, mask, can, 0, 1, model, (20,), lambda w: sig)
    assert oneshot_targets(t) == {k: pytest.approx(296 / 416) for k in
                                  (("dense_0", "kernel"), ("dense_1", "kernel"), ("output", "kernel"))}
    ticket = ArmStart({"params": params[0]}, mask, can, 0, 1, model, (20,),
                      lambda w: type("S", (), {"cfg": dataclasses.replace(cfg.prune, oneshot_allocation="ticket")}))
    assert oneshot_targets(ticket)[("dense_0", "kernel")] == 0.5


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"prune.calib_batches = 0 is not allowed; expected an integer in \[1, 4096\]"):
        tiny(prune={"calib_batches": 0})
    with pytest.raises(ConfigError, match=r"prune.oneshot_allocation = 'global' is not allowed"):
        tiny(prune={"oneshot_allocation": "global"})
    with pytest.raises(ConfigError, match=r"prune.oneshot_finetune_steps = 0 is not allowed"):
        tiny(prune={"oneshot_finetune_steps": 0})
    # QAT from the rewind point: the one-shot arms never had one (before any work, when the file is read)
    for arms in (["ticket", "wanda"], ["ticket", "sparsegpt_ft"]):
        with pytest.raises(ConfigError, match=r"quant.qat_start = 'rewind' is not allowed for the one-shot arms "
                                              rf"\['{arms[1]}'\].*use quant.qat_start = 'trained'") as e:
            tiny(arms=arms, quant={"method": ["qat"], "qat_start": "rewind"})
        assert "\n" not in str(e.value)
        tiny(arms=arms, quant={"method": ["qat"], "qat_start": "trained"})
        tiny(arms=arms, quant={"method": ["qat"], "qat_start": "rewind", "arms": ["ticket"]})
    # a layer the calibrated methods cannot take is named (before any work, Lottery._check_oneshot)
    model = Embedder()
    shapes = jax.eval_shape(lambda k: model.init(k, np.zeros((1, 3), np.int32))["params"], jax.random.key(0))
    can = jax.tree.map(lambda p: len(p.shape) >= 2, shapes)
    assert unsupported_layers(model, shapes, {}, jax.ShapeDtypeStruct((1, 3), np.int32), can) == ["embed/embedding"]
    conv = build_model(ModelConfig(name="conv2", width=0.25), 10, (8, 8, 1))
    shapes = jax.eval_shape(lambda k: conv.init(k, np.zeros((1, 8, 8, 1)))["params"], jax.random.key(0))
    can = jax.tree.map(lambda p: len(p.shape) >= 2, shapes)
    assert unsupported_layers(conv, shapes, {}, jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32), can) == []


class Embedder(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(4, name="out")(nn.Embed(10, 6, name="embed")(x).reshape(x.shape[0], -1))


def test_conv_layers_prune_from_their_im2col_inputs():
    model = build_model(ModelConfig(name="conv2", width=0.25), 10, (8, 8, 1))
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype(np.float32)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), x[:1])["params"])
    k0 = params["conv_0"]["kernel"]  # [3, 3, 1, c]
    rows = conv_patches(nn.Conv(k0.shape[-1], (3, 3), padding="SAME"), jax.numpy.asarray(x))
    out = jax.lax.conv_general_dilated(x, k0, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(rows @ k0.reshape(-1, k0.shape[-1]), np.asarray(out).reshape(-1, k0.shape[-1]),
                               rtol=1e-4, atol=1e-5)
    t = {("conv_1", "kernel"): 0.5}  # conv_1 sees conv_0's output: 3 x 3 x c inputs
    (p_sg,), (m_sg,) = prune_population(model, ["sparsegpt"], [params], [{}], [x], [t])
    (p_w,), (m_w,) = prune_population(model, ["wanda"], [params], [{}], [x], [t])
    k1 = params["conv_1"]["kernel"]
    assert m_sg["conv_1"]["kernel"].sum() == k1.size // 2 and (m_w["conv_1"]["kernel"].reshape(-1, k1.shape[-1]).sum(0)
                                                               == k1.size // 2 // k1.shape[-1]).all()
    h = jax.nn.relu(out + params["conv_0"]["bias"])
    X = np.asarray(conv_patches(nn.Conv(k1.shape[-1], (3, 3), padding="SAME"), h))
    w = k1.reshape(-1, k1.shape[-1]).T
    err = reconstruction_error(w, p_sg["conv_1"]["kernel"].reshape(-1, k1.shape[-1]).T, X)
    assert err < reconstruction_error(w, (k1 * m_sg["conv_1"]["kernel"]).reshape(-1, k1.shape[-1]).T, X)
    assert (p_sg["conv_1"]["kernel"][~m_sg["conv_1"]["kernel"]] == 0).all()


def test_fine_tune_settings_separate_population_groups():
    a = tiny(arms=["ticket", "wanda_ft"])
    b = tiny(arms=["ticket", "wanda_ft"], prune={"oneshot_finetune_steps": 7})
    assert population_key(a) != population_key(b)
    assert population_key(tiny(arms=["ticket", "wanda"])) == population_key(tiny(arms=["ticket", "wanda"],
                                                                                 prune={"oneshot_finetune_steps": 7}))


def test_nm_levels_give_each_grouped_layer_the_tickets_k_of_m():
    cfg = tiny(prune={"granularity": "n:m", "n": 2, "m": 4})
    model, params, _ = _model_and_params()  # kernels [20, 12], [12, 8], [8, 10]
    can = jax.tree.map(lambda p: p.ndim == 2, params[0])
    mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params[0])
    mask["dense_0"]["kernel"].reshape(5, 4, 12)[:, 3, :] = False  # 3:4
    mask["dense_1"]["kernel"].reshape(3, 4, 8)[:, 2:, :] = False  # 2:4; output stays 4:4 (dense)
    sig = type("S", (), {"cfg": cfg.prune})
    t = ArmStart({"params": params[0]}, mask, can, 0, 1, model, (20,), lambda w: sig)
    assert oneshot_targets(t) == {("dense_0", "kernel"): (3, 4), ("dense_1", "kernel"): (2, 4)}


def test_one_compile_per_layer_shape_and_target_not_per_member():
    from lth.prune import oneshot_net

    model, params, xs = _model_and_params()
    t = {("dense_0", "kernel"): 0.25, ("dense_1", "kernel"): 0.25}
    oneshot_net._layer_fn.cache_clear()
    oneshot_net._capture_fn.cache_clear()
    prune_population(model, ["sparsegpt"] * 4, params * 2, [{}] * 4, xs * 2, [t] * 4)
    fn = oneshot_net._layer_fn("sparsegpt", 0.25, None)
    assert fn._cache_size() == 2  # one program per layer shape, all 4 members in it
    assert oneshot_net._capture_fn(model)._cache_size() == 1  # the forward pass: once, run once per layer


def test_runs_trained_as_one_population_equal_the_run_alone(tmp_path):
    from lth.lottery.groups import run_group

    small = {"seeds": [0], "arms": ["ticket", "wanda", "sparsegpt_ft"], "train": {"steps": 20, "eval_every": 10}}
    a = tiny(**small, prune={"levels": 1, "rate": 0.3, "calib_batches": 1, "oneshot_finetune_steps": 5})
    b = tiny(**small, prune={"levels": 1, "rate": 0.5, "calib_batches": 1, "oneshot_finetune_steps": 5})
    assert population_key(a) == population_key(b)
    run_group([a, b], tmp_path / "group", progress=False)
    Lottery(a, tmp_path / "alone", progress=False).run()
    for arm in ("ticket", "wanda", "sparsegpt_ft"):
        (m1, p1), (m2, p2) = (member(tmp_path / root / a.run_id, 1, arm) for root in ("group", "alone"))
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(m1), jax.tree.leaves(m2))), arm
        for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
            np.testing.assert_allclose(x, y, atol=1e-5)
    wanda_a, _ = member(tmp_path / "alone" / a.run_id, 1, "wanda")
    wanda_b, _ = member(tmp_path / "group" / b.run_id, 1, "wanda")
    assert wanda_b["dense_0"]["kernel"].sum() < wanda_a["dense_0"]["kernel"].sum()  # b prunes more

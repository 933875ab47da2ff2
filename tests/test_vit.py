"""The ViT end to end on tiny random images: IMP with late rewinding, rates by layer kind, controls,
population == alone, small-dense widths and the quant stage (PTQ)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lth.data
from analysis import load_quant
from lth.config import ConfigError, ModelConfig, PruneConfig
from lth.lottery import Lottery, run_lottery
from lth.models import build_model, param_count, structure_of
from lth.pipeline import run_experiment
from lth.prune.baselines import match_width
from lth.prune.masks import expected_counts, layer_rates, prunable
from lth.store import load_tree
from lth.train import unstack

from helpers import quadrant_images, tiny

BLOBS = "vit_test_images"


tiny_images = quadrant_images  # 8x8x1 images of 4 classes (tests/helpers.py)


if BLOBS not in lth.data.DATASETS:
    lth.data.register(BLOBS, val_size=20, num_classes=4)(tiny_images)

VIT = {"name": "vit", "widths": [300, 100], "patch": 4, "dim": 16, "depth": 1, "heads": 2, "mlp_ratio": 2.0}
RATES = {"attn": 0.5, "head": 0.2, "block_0/mlp/fc_out": 0.4}  # kinds, and a layer name that wins over mlp


def vit_cfg(**sections):
    base = dict(data={"name": BLOBS, "val_size": 20}, model=VIT, seeds=[0], arms=["ticket", "random_prune"],
                train={"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05, "batch_size": 20, "steps": 8,
                       "eval_every": 4},
                prune={"levels": 2, "rate": 0.3, "rates": RATES}, rewind={"step": 2})
    return tiny(**{**base, **sections})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("vit")
    cfg = vit_cfg(quant={"bits": [8], "method": ["ptq"], "levels": [2], "calib_batches": 2})
    run_experiment(cfg, out)
    return cfg, out, Lottery(cfg, out)


def leaves_with_names(tree):
    return [("/".join(str(getattr(k, "key", k)) for k in path), np.asarray(x))
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_rates_by_kind_resolve_per_layer():
    model = build_model(ModelConfig(**{k: v for k, v in VIT.items()}), 4, (8, 8, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    st = structure_of(model)
    rates = dict(leaves_with_names(layer_rates(shapes, PruneConfig(rate=0.3, rates=RATES), st)))
    for q in ("q", "k", "v", "out"):
        assert rates[f"block_0/attn/{q}/kernel"] == 0.5
    assert rates["block_0/mlp/fc_in/kernel"] == 0.3  # mlp: prune.rate
    assert rates["block_0/mlp/fc_out/kernel"] == 0.4  # its own name wins over its kind
    assert rates["output/kernel"] == 0.2 and rates["embed/kernel"] == 0.0  # head named, embed spared
    assert all(v == 0.0 for k, v in rates.items() if not k.endswith("kernel"))
    # by default attn and mlp only: embed, head, position embedding, CLS token and norms are not prunable
    can = dict(leaves_with_names(prunable(shapes, PruneConfig(), st)))
    assert {k for k, v in can.items() if v} == {f"block_0/attn/{q}/kernel" for q in ("q", "k", "v", "out")} | {
        "block_0/mlp/fc_in/kernel", "block_0/mlp/fc_out/kernel"}
    assert dict(leaves_with_names(prunable(shapes, PruneConfig(rates={"embed": 0.1}), st)))["embed/kernel"]


def test_a_rate_for_an_unknown_layer_or_kind_is_refused_naming_the_kinds(tmp_path):
    with pytest.raises(ConfigError, match=r"prune.rates names layer 'atn'.*its layer kinds: attn, embed, head, mlp"):
        Lottery(vit_cfg(prune={"levels": 1, "rates": {"atn": 0.5}}), tmp_path)


def test_bad_patch_and_heads_are_one_line_errors():
    with pytest.raises(ValueError, match=r"model.patch = 3 does not divide the images of shape \(8, 8, 1\)"):
        build_model(ModelConfig(name="vit", patch=3), 4, (8, 8, 1))
    with pytest.raises(ValueError, match=r"model.dim = 30 is not a multiple of model.heads = 4"):
        build_model(ModelConfig(name="vit", dim=30, heads=4), 4, (8, 8, 1))


def test_pruned_attention_and_mlp_weights_stay_exactly_zero_through_imp(finished):
    cfg, out, lottery = finished
    store = lottery.store
    params0 = unstack(load_tree(store.path / "init.msgpack")["params"], 0)
    st = structure_of(lottery.model)
    for level in range(3):
        want = dict(leaves_with_names(expected_counts(params0, cfg.prune, level, st)))
        masks = load_tree(store.level_dir(level) / "masks.msgpack")
        final = load_tree(store.level_dir(level) / "final.msgpack")["params"]
        for k in range(1 if level == 0 else 2):  # ticket, random_prune
            m = dict(leaves_with_names(unstack(masks, k)))
            p = dict(leaves_with_names(unstack(final, k)))
            for name, mask in m.items():
                assert int(mask.sum()) == want[name], (level, k, name)  # exact counts, kinds resolved
                assert np.all(p[name][~mask] == 0.0), (level, k, name)
                assert np.all(p[name][mask] != 0.0) or not name.endswith("kernel")  # survivors trained
            if level == 2:
                assert m["block_0/attn/q/kernel"].mean() == 0.25 and m["embed/kernel"].all()
                assert abs(m["block_0/mlp/fc_in/kernel"].mean() - 0.49) < 1e-2  # 0.7^2, rounded per level


def test_population_equals_member_alone(finished, tmp_path):
    cfg, out, lottery = finished
    alone = run_lottery(dataclasses.replace(cfg, arms=("ticket",), quant=None,
                                            prune=dataclasses.replace(cfg.prune, levels=1)), tmp_path)
    assert alone.path.name == lottery.store.path.name  # arms and levels grow a run: the same id
    together = load_tree(lottery.store.level_dir(1) / "final.msgpack")["params"]
    single = load_tree(alone.level_dir(1) / "final.msgpack")["params"]
    for a, b in zip(jax.tree.leaves(unstack(together, 0)), jax.tree.leaves(unstack(single, 0))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_small_dense_widths_reach_the_tickets_count_within_2_percent():
    mc = ModelConfig(name="vit", patch=4, dim=64, depth=2, heads=4, mlp_ratio=2.0)
    model = build_model(mc, 10, (28, 28, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    total = param_count(shapes)
    can = jax.tree.leaves(prunable(shapes, PruneConfig(), structure_of(model)))
    prunable_n = sum(int(np.prod(s.shape)) for s, c in zip(jax.tree.leaves(shapes), can) if c)
    for density in (0.8, 0.5, 0.21, 0.107):
        target = total - round((1 - density) * prunable_n)
        width, count = match_width(mc, 10, (28, 28, 1), target)
        assert width < 1 and abs(count - target) <= 0.02 * target, (density, width, count, target)


def test_the_quant_stage_quantizes_the_vit_and_keeps_pruned_weights_zero(finished):
    cfg, out, lottery = finished
    from lth.quant import QuantSpec, quantize_member
    from lth.stored import StoredRun

    q = load_quant(out)
    assert set(q["arm"]) == {"ticket", "random_prune"} and set(q["bits"]) == {8} and set(q["level"]) == {2}
    assert np.all(np.abs(q["accuracy"] - q["float_accuracy"]) <= 0.05)  # 8 bits: at most 2 of 40 test images flip
    run = StoredRun.open(lottery.store.path)
    masks = run.population(2).masks
    qt, _ = quantize_member(run, 2, QuantSpec(4, act_bits=8), method="ptq", qc=cfg.quant)
    for name in ("q", "k", "v", "out"):
        w = np.asarray(qt.params["block_0"]["attn"][name]["kernel"])
        assert np.all(w[~masks["block_0"]["attn"][name]["kernel"][0]] == 0.0)
        assert max(len(np.unique(col[col != 0])) for col in w.T) <= 2 ** 4  # 4 bits per output channel


def test_head_pruning_removes_whole_heads_whose_contribution_is_then_exactly_zero():
    from lth.prune.heads import alive_heads, head_prune
    from lth.prune.structured import structured_prune

    model = build_model(ModelConfig(name="vit", patch=4, dim=16, depth=2, heads=4, mlp_ratio=2.0), 4, (8, 8, 1))
    params = jax.tree.map(np.asarray, model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))["params"])
    ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    cfg = PruneConfig(granularity="head", rate=0.3, rates={"block_1/attn": 0.5})
    mask = structured_prune(params, ones, cfg, model)
    assert head_prune(params, ones, cfg, structure_of(model)) is not None
    assert alive_heads(mask, "block_0/attn", 4).sum() == 3  # round_half_up(0.3 * 4) = 1 head
    assert alive_heads(mask, "block_1/attn", 4).sum() == 2  # its layer's rate
    attn = mask["block_0"]["attn"]
    dead = int(np.flatnonzero(~alive_heads(mask, "block_0/attn", 4))[0])
    cols = slice(4 * dead, 4 * dead + 4)
    for x in ("q", "k", "v"):
        assert not attn[x]["kernel"][:, cols].any() and attn[x]["kernel"].sum() == 16 * 12
    assert not attn["out"]["kernel"][cols].any() and attn["out"]["kernel"].sum() == 12 * 16
    assert mask["block_0"]["mlp"]["fc_in"]["kernel"].all() and mask["embed"]["kernel"].all()
    masked = jax.tree.map(lambda p, m: np.where(m, p, 0.0), params, mask)
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    y = model.apply({"params": masked}, x)
    # anything in the removed head's q, k, v (and its biases) leaves the output unchanged
    poked = jax.tree.map(np.copy, masked)
    for x_ in ("q", "k", "v"):
        poked["block_0"]["attn"][x_]["kernel"][:, cols] = 5.0
        poked["block_0"]["attn"][x_]["bias"][cols] = -3.0
    np.testing.assert_array_equal(model.apply({"params": poked}, x), y)
    # the granularity is refused for a model without declared heads
    from lth.prune.structured import check_granularity
    mlp = build_model(ModelConfig(), 10, (40,))
    with pytest.raises(ConfigError, match=r"prune.granularity = 'head' is not allowed with model.name = 'mlp' \(it "
                                          r"declares no multi-head attention"):
        check_granularity(PruneConfig(granularity="head", levels=1), mlp,
                          jax.eval_shape(mlp.init, jax.random.key(0), jnp.zeros((1, 40)))["params"], "mlp")

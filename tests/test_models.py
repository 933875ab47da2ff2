"""Model registry: shapes, widths, parameter counts, init schemes, batch norm, layer naming."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import DictKey

from lth import config
from lth.config import ModelConfig
from lth.models import (MODELS, OUTPUT, build_model, is_conv_kernel, layer_kind, layer_kinds,
                        loop_friendly_conv, output_layer_name, param_count, register, scale_width,
                        structure_of)

CIFAR = (32, 32, 3)
NATURAL = [("mlp", (40,)), ("mlp", (28, 28, 1)), ("lenet_300_100", (28, 28, 1)),
           ("conv2", CIFAR), ("conv4", CIFAR), ("conv6", CIFAR), ("vgg11", CIFAR), ("vgg16", CIFAR),
           ("vgg19", CIFAR), ("resnet20", CIFAR), ("vit", CIFAR), ("vit", (28, 28, 1))]
BN_MODELS = ("vgg11", "vgg16", "vgg19", "resnet20")
NUM_CLASSES = 7  # not 10, so a hard-coded output width would fail


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    # XLA compile time dominates these tests on CPU; results here do not depend on optimization.
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _x(shape, batch=2, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, *shape))


@functools.cache
def _init(name, shape, num_classes=NUM_CLASSES, **model_kw):
    model = build_model(ModelConfig(name=name, **model_kw), num_classes, shape)
    return model, model.init(jax.random.key(0), _x(shape))


def _shapes(name, shape, num_classes=10, **model_kw):
    """Params shapes without computing them (ShapeDtypeStruct leaves)."""
    model = build_model(ModelConfig(name=name, **model_kw), num_classes, shape)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, *shape)))["params"]


def _kinds_by_name(tree, structure=None):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): layer_kind(path, leaf, structure) for path, leaf in flat}


# ---------------------------------------------------------------------------- registry

def test_config_accepts_exactly_the_registered_models():
    from lth import registry
    assert registry.MODELS.names()[:len(MODELS)] == list(MODELS)
    for name in MODELS:
        assert config.ModelConfig(name=name).name == name
    with pytest.raises(config.ConfigError, match="model.name = 'mlp2': unknown model 'mlp2'; registered: mlp, "):
        config.ModelConfig(name="mlp2")


def test_register_adds_a_builder_and_rejects_duplicates():
    @register("tiny_test_model")
    def tiny(cfg, num_classes, input_shape):
        return MODELS["mlp"](cfg, num_classes, input_shape)

    try:
        model = build_model(ModelConfig(name="tiny_test_model", widths=(3,)), 2, (5,))
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5)))["params"]
        assert params["dense_0"]["kernel"].shape == (5, 3)
        with pytest.raises(ValueError, match="already registered"):
            register("tiny_test_model")(tiny)
    finally:
        del MODELS["tiny_test_model"]


def test_unknown_model_is_a_clear_error():
    with pytest.raises(config.ConfigError, match="unknown model 'nope'.*resnet20"):
        ModelConfig(name="nope")


# ---------------------------------------------------------------------------- forward pass

@pytest.mark.parametrize("name,shape", NATURAL, ids=[f"{n}-{len(s)}d" for n, s in NATURAL])
def test_logits_shape_come_from_output_layer(name, shape):
    model, variables = _init(name, shape)
    assert ("batch_stats" in variables) == (name in BN_MODELS)
    x = _x(shape, seed=2)
    logits, state = model.apply(variables, x, capture_intermediates=True)
    assert logits.shape == (2, NUM_CLASSES)
    assert np.all(np.isfinite(logits))
    # the last layer is the top-level Dense named `output`, and it produces the logits
    assert output_layer_name(variables["params"]) == OUTPUT
    np.testing.assert_array_equal(state["intermediates"][OUTPUT]["__call__"][0], logits)
    assert variables["params"][OUTPUT]["kernel"].shape[-1] == NUM_CLASSES


# the classifiers; gpt declares frozen embeddings, norms and head (tests/test_gpt.py checks its kinds)
@pytest.mark.parametrize("name", [m for m in MODELS if m != "gpt"])
def test_every_leaf_has_a_kind_and_one_output_kernel(name):
    shape = (40,) if name == "mlp" else (28, 28, 1) if name == "lenet_300_100" else CIFAR
    st = structure_of(build_model(ModelConfig(name=name), 10, shape))
    kinds = _kinds_by_name(_shapes(name, shape), st)
    assert [k for k, v in kinds.items() if v == "output"] == ["output/kernel"]
    for leaf, kind in kinds.items():
        module, last = leaf.split("/")[-2:]
        if any(leaf.startswith(f + "/") for f in st.frozen):  # declared (a transformer's embeddings, norms)
            assert kind == "frozen", leaf
        elif last == "kernel":
            assert kind in ("conv", "dense", "output"), leaf
        else:
            assert kind == ("norm" if module.startswith("bn") else "bias"), leaf
    convs = [k for k, v in kinds.items() if v == "conv"]
    assert (len(convs) > 0) == (name not in ("mlp", "lenet_300_100", "vit"))


# ---------------------------------------------------------------------------- architecture

def test_lenet_300_100_param_count_ignores_widths():
    expected = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert expected == 266610
    assert param_count(_shapes("lenet_300_100", (28, 28, 1), widths=(5,))) == expected
    assert param_count(_shapes("lenet_300_100", (784,))) == expected


def test_conv2_cifar_param_count():
    conv = (3 * 3 * 3 * 64 + 64) + (3 * 3 * 64 * 64 + 64)
    fc = (16 * 16 * 64 * 256 + 256) + (256 * 256 + 256) + (256 * 10 + 10)
    assert param_count(_shapes("conv2", CIFAR)) == conv + fc == 4_301_642


def test_conv4_conv6_layers_follow_frankle_carbin():
    p4, p6 = _shapes("conv4", CIFAR), _shapes("conv6", CIFAR)
    assert [p4[f"conv_{i}"]["kernel"].shape[-1] for i in range(4)] == [64, 64, 128, 128]
    assert p4["dense_0"]["kernel"].shape == (8 * 8 * 128, 256)
    assert [p6[f"conv_{i}"]["kernel"].shape[-1] for i in range(6)] == [64, 64, 128, 128, 256, 256]
    assert p6["dense_0"]["kernel"].shape == (4 * 4 * 256, 256)
    assert p6["dense_1"]["kernel"].shape == (256, 256)


@pytest.mark.parametrize("name,n_convs", [("vgg11", 8), ("vgg16", 13), ("vgg19", 16)])
def test_vgg_plans(name, n_convs):
    params = _shapes(name, CIFAR)
    convs = sorted((k for k in params if k.startswith("conv_")), key=lambda k: int(k.split("_")[1]))
    assert len(convs) == n_convs
    assert [k for k in params if k.startswith("dense")] == []  # one Dense: the output
    assert params[convs[0]]["kernel"].shape == (3, 3, 3, 64)
    assert params[convs[-1]]["kernel"].shape == (3, 3, 512, 512)
    assert "bias" not in params[convs[0]]  # BN follows every conv
    assert params[f"bn_{n_convs - 1}"]["scale"].shape == (512,)
    assert params[OUTPUT]["kernel"].shape == (512, 10)


def test_resnet20_blocks_and_projections():
    params = _shapes("resnet20", CIFAR)
    blocks = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(3)]
    assert set(params) == {"conv_0", "bn_0", OUTPUT, *blocks}
    convs = [k for k in _kinds_by_name(params) if k.endswith("kernel") and not k.startswith(OUTPUT)]
    assert len(convs) == 1 + 9 * 2 + 2  # stem, 18 block convs, 2 projection shortcuts
    with_proj = [b for b in blocks if "conv_shortcut" in params[b]]
    assert with_proj == ["stage2_block0", "stage3_block0"]
    assert params["stage2_block0"]["conv_shortcut"]["kernel"].shape == (1, 1, 16, 32)
    assert params["stage3_block2"]["conv_1"]["kernel"].shape == (3, 3, 64, 64)
    assert params[OUTPUT]["kernel"].shape == (64, 10)


def test_resnet20_downsamples_twice():
    model = build_model(ModelConfig(name="resnet20"), 10, CIFAR)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, capture_intermediates=True,
                                                          mutable=True), jnp.zeros((2, *CIFAR)))
    inter = out[1]["intermediates"]
    assert inter["stage1_block2"]["__call__"][0].shape == (2, 32, 32, 16)
    assert inter["stage2_block0"]["__call__"][0].shape == (2, 16, 16, 32)
    assert inter["stage3_block2"]["__call__"][0].shape == (2, 8, 8, 64)


# ---------------------------------------------------------------------------- width multiplier

def test_scale_width_rounds_and_keeps_one_unit():
    assert scale_width(300, 0.5) == 150
    assert scale_width(100, 0.333) == 33
    assert scale_width(300, 0.999) == 300  # rounds, not floors
    assert scale_width(10, 0.26) == 3
    assert scale_width(64, 0.001) == 1
    assert scale_width(16, 2.0) == 32


def test_width_halves_mlp_hidden_layers_not_output():
    p = _shapes("mlp", (40,), widths=(300, 100), width=0.5)
    assert p["dense_0"]["kernel"].shape == (40, 150)
    assert p["dense_1"]["kernel"].shape == (150, 50)
    assert p[OUTPUT]["kernel"].shape == (50, 10)
    p = _shapes("lenet_300_100", (28, 28, 1), width=0.5)
    assert p["dense_1"]["kernel"].shape == (150, 50)


def test_width_halves_conv2_channels_and_fc_not_output():
    p = _shapes("conv2", CIFAR, width=0.5)
    assert p["conv_0"]["kernel"].shape == (3, 3, 3, 32)
    assert p["conv_1"]["kernel"].shape == (3, 3, 32, 32)
    assert p["dense_0"]["kernel"].shape == (16 * 16 * 32, 128)
    assert p["dense_1"]["kernel"].shape == (128, 128)
    assert p[OUTPUT]["kernel"].shape == (128, 10)


def test_width_scales_vgg_and_resnet():
    v = _shapes("vgg11", CIFAR, width=0.25)
    assert v["conv_0"]["kernel"].shape == (3, 3, 3, 16) and v[OUTPUT]["kernel"].shape == (128, 10)
    r = _shapes("resnet20", CIFAR, width=0.5)
    assert r["conv_0"]["kernel"].shape == (3, 3, 3, 8)
    assert r["stage3_block2"]["conv_1"]["kernel"].shape == (3, 3, 32, 32)
    assert r[OUTPUT]["kernel"].shape == (32, 10)


# ---------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("name", ["conv2", "conv4", "conv6", "vgg11", "vgg16", "vgg19", "resnet20"])
def test_image_models_reject_flat_inputs(name):
    with pytest.raises(ValueError) as e:
        build_model(ModelConfig(name=name), 10, (40,))
    assert str(e.value) == f"model {name} needs image inputs [H, W, C]; data set gives shape (40,)"


def test_image_too_small_for_the_pools_is_an_error():
    with pytest.raises(ValueError, match=r"model vgg16 .* needs H, W >= 16; data set gives shape \(8, 8, 3\)"):
        build_model(ModelConfig(name="vgg16"), 10, (8, 8, 3))
    build_model(ModelConfig(name="vgg16"), 10, (28, 28, 1))  # fashion_mnist fits


# ---------------------------------------------------------------------------- init schemes

@pytest.mark.parametrize("init", ["glorot_normal", "kaiming_normal"])
def test_init_std_matches_formula(init):
    # glorot: Var = 2 / (fan_in + fan_out) (Glorot & Bengio 2010); kaiming: Var = 2 / fan_in (He et al. 2015)
    def expected(fan_in, fan_out):
        return math.sqrt(2 / (fan_in + fan_out)) if init == "glorot_normal" else math.sqrt(2 / fan_in)

    _, v = _init("mlp", (1000,), widths=(1000,), init=init)
    k = np.asarray(v["params"]["dense_0"]["kernel"])
    assert k.shape == (1000, 1000)
    assert abs(k.std() / expected(1000, 1000) - 1) < 0.02
    assert abs(k.mean()) < 1e-3
    np.testing.assert_array_equal(v["params"]["dense_0"]["bias"], 0.0)

    _, v = _init("conv2", (8, 8, 3), init=init)
    k = np.asarray(v["params"]["conv_1"]["kernel"])  # 3x3x64x64: fan_in = fan_out = 576
    assert abs(k.std() / expected(576, 576) - 1) < 0.03
    np.testing.assert_array_equal(v["params"]["conv_1"]["bias"], 0.0)
    np.testing.assert_array_equal(v["params"][OUTPUT]["bias"], 0.0)


# ---------------------------------------------------------------------------- batch norm

@pytest.mark.parametrize("name", ["vgg11", "resnet20"])
def test_batch_norm_updates_running_stats_in_training(name):
    model, variables = _init(name, CIFAR)
    bs = variables["batch_stats"]
    np.testing.assert_array_equal(bs["bn_0"]["mean"], 0.0)
    np.testing.assert_array_equal(bs["bn_0"]["var"], 1.0)
    np.testing.assert_array_equal(variables["params"]["bn_0"]["scale"], 1.0)
    x = _x(CIFAR, seed=3)
    logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                              capture_intermediates=lambda mdl, _: mdl.name == "conv_0")
    new = upd["batch_stats"]
    assert jax.tree.structure(new) == jax.tree.structure(bs)
    # flax: running = momentum * running + (1 - momentum) * batch, with momentum 0.9
    conv_out = upd["intermediates"]["conv_0"]["__call__"][0]
    np.testing.assert_allclose(new["bn_0"]["mean"], 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    assert not np.allclose(new["bn_0"]["var"], 1.0)
    # eval mode uses the running statistics, so it differs from the train-mode output
    assert not np.allclose(model.apply(variables, x, train=False), logits)


# ---------------------------------------------------------------------------- layer kinds

def test_layer_kind_conv2():
    _, v = _init("conv2", CIFAR)
    kinds = layer_kinds(v["params"])
    assert kinds["conv_0"] == {"kernel": "conv", "bias": "bias"}
    assert kinds["conv_1"]["kernel"] == "conv"
    assert kinds["dense_0"] == {"kernel": "dense", "bias": "bias"}
    assert kinds["dense_1"]["kernel"] == "dense"
    assert kinds[OUTPUT] == {"kernel": "output", "bias": "bias"}
    convs = jax.tree_util.tree_map_with_path(is_conv_kernel, v["params"])
    assert sum(jax.tree.leaves(convs)) == 2


def test_layer_kind_resnet20():
    _, v = _init("resnet20", CIFAR)
    kinds = layer_kinds(v["params"])
    assert kinds["conv_0"] == {"kernel": "conv"}
    assert kinds["bn_0"] == {"scale": "norm", "bias": "norm"}
    blk = kinds["stage2_block0"]
    assert blk["conv_0"]["kernel"] == blk["conv_1"]["kernel"] == blk["conv_shortcut"]["kernel"] == "conv"
    assert blk["bn_1"] == blk["bn_shortcut"] == {"scale": "norm", "bias": "norm"}
    assert kinds[OUTPUT] == {"kernel": "output", "bias": "bias"}
    stats = _kinds_by_name(v["batch_stats"])
    assert set(stats.values()) == {"norm"}
    # the full variables dict (with a leading 'params'/'batch_stats' key) classifies the same way
    # (the init also returns the sown "activations" collection, which is not a parameter tree)
    variables = {k: v[k] for k in ("params", "batch_stats")}
    assert _kinds_by_name(variables)["params/stage3_block1/bn_0/bias"] == "norm"


def test_layer_kind_uses_names_so_stacked_population_trees_work():
    path = (DictKey("dense_0"), DictKey("kernel"))
    assert layer_kind(path, np.zeros((4, 30, 20))) == "dense"  # [K, in, out]
    assert layer_kind((DictKey(OUTPUT), DictKey("kernel")), np.zeros((4, 20, 10))) == "output"
    # layers named otherwise fall back to the kernel's rank
    assert layer_kind((DictKey("foo"), DictKey("kernel")), np.zeros((3, 3, 2, 4))) == "conv"
    assert layer_kind((DictKey("foo"), DictKey("kernel")), np.zeros((3, 4))) == "dense"
    with pytest.raises(ValueError, match="cannot classify parameter 'foo/embedding'"):
        layer_kind((DictKey("foo"), DictKey("embedding")), np.zeros(3))


def test_output_layer_name_missing_is_an_error():
    with pytest.raises(KeyError, match="no 'output' layer"):
        output_layer_name({"dense_0": {}})


NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("kernel, strides, padding, size", [
    (3, 1, "SAME", 6), (3, 2, "SAME", 6), (3, 2, "SAME", 7), (1, 2, "SAME", 6), (3, 1, "VALID", 5),
    (3, 2, ((2, 0), (1, 1)), 7)])
def test_loop_friendly_conv_has_the_gradients_of_lax_conv(kernel, strides, padding, size):
    """lth's conv layers write the input and weight gradients themselves (NHWC x HWIO convolutions,
    which XLA's CPU backend runs fast inside a scan): the same values as jax's own gradients."""
    rng = np.random.default_rng(kernel + strides + size)
    x = jnp.asarray(rng.normal(size=(3, size, size, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 2, 5)), jnp.float32)
    st = (strides, strides)

    def loss(conv, x, w):  # a non-linear function of the output, so dy differs per position
        return jnp.sum(jnp.sin(conv(x, w, st, padding, dimension_numbers=NHWC)))

    ours = jax.value_and_grad(functools.partial(loss, loop_friendly_conv), (0, 1))(x, w)
    ref = jax.value_and_grad(functools.partial(loss, jax.lax.conv_general_dilated), (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_loop_friendly_conv_gradient_is_the_same_in_a_scan_and_at_top_level():
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(2, 4, 8, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    grad = jax.grad(lambda w, x: jnp.sum(jnp.sin(loop_friendly_conv(x, w, (2, 2), "SAME", dimension_numbers=NHWC))))
    top = [jax.jit(grad)(w, x) for x in xs]
    scanned = jax.jit(lambda w, xs: jax.lax.scan(lambda c, x: (c, grad(w, x)), 0, xs)[1])(w, xs)
    for t, s in zip(top, scanned):
        np.testing.assert_array_equal(t, s)

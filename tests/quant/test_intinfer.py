"""Integer inference (int8 operands, int32 accumulation) agrees with the fake-quant model."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import ExperimentConfig
from lth.quant.intinfer import _compiled, _device_arrays, from_quantized
from lth.models import MLP, build_model
from lth.quant import QuantSpec, fake_quant_predict, layer_program, ptq
from helpers import random_params as _random_params


# Glorot-scaled params with kernels pruned at random to half density (shared with the quant tests)
random_params = functools.partial(_random_params, density=0.5)


@pytest.fixture(scope="module")
def mlp():
    model = MLP((48, 32), 10)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3000, 20)) * np.linspace(0.5, 3, 20) + 0.3).astype(np.float32)
    return model, random_params(model, (20,)), x


@pytest.fixture(scope="module")
def conv2():
    cfg = ExperimentConfig.from_dict({"model": {"name": "conv2", "width": 0.125}}).model
    model = build_model(cfg, 10, (8, 8, 3))  # conv 8, conv 8, pool, fc 32, fc 32, output
    x = np.random.default_rng(1).normal(size=(2000, 8, 8, 3)).astype(np.float32)
    return model, random_params(model, (8, 8, 3), 1), x


def agreement(model, qt, x, input_shape):
    im = from_quantized(model, qt, input_shape, 10)
    return float(np.mean(im.predict(x) == fake_quant_predict(model, qt, x))), im


@pytest.mark.parametrize("spec", [
    QuantSpec(8, "sym", "channel", "minmax", act_bits=8),
    QuantSpec(8, "asym", "tensor", "mse", act_bits=8, act_scheme="asym"),
    QuantSpec(4, "asym", "channel", "percentile", act_bits=8, act_scheme="sym"),
    QuantSpec(2, "sym", "channel", "minmax", act_bits=4),
    QuantSpec(1, "sym", "tensor", "minmax", act_bits=8),
], ids=lambda s: f"w{s.bits}{s.scheme}-{s.granularity}-a{s.act_bits}{s.act_scheme}")
def test_integer_mlp_matches_fake_quant(mlp, spec):
    model, params, x = mlp
    qt = ptq(model, params, {}, spec, x[:512], bias_correction=spec.bits == 4)
    agree, im = agreement(model, qt, x, (20,))
    assert agree >= 0.999
    assert len(np.unique(im.predict(x))) > 3  # a non-degenerate network


@pytest.mark.parametrize("spec", [
    QuantSpec(8, "sym", "channel", "minmax", act_bits=8),
    QuantSpec(4, "asym", "channel", "mse", act_bits=8),
], ids=["w8sym", "w4asym"])
def test_integer_conv2_matches_fake_quant(conv2, spec):
    model, params, x = conv2
    qt = ptq(model, params, {}, spec, x[:256])
    agree, im = agreement(model, qt, x, (8, 8, 3))
    assert agree >= 0.999
    assert len(np.unique(im.predict(x))) > 3


def test_the_integer_program_multiplies_int8_and_accumulates_in_int32(conv2):
    model, params, x = conv2
    qt = ptq(model, params, {}, QuantSpec(8, "asym", "channel", "minmax", act_bits=8), x[:256])
    im = from_quantized(model, qt, (8, 8, 3), 10)
    arrays = _device_arrays(im)
    assert all(a["w8"].dtype == jnp.int8 for a in arrays.values())
    hlo = _compiled(im).lower(arrays, jnp.asarray(x[:4])).as_text()
    # every dot/conv takes int8 operands and produces int32
    ops = [line for line in hlo.splitlines() if "stablehlo.convolution" in line or "stablehlo.dot_general" in line]
    assert len(ops) >= 5  # 2 convs (+ their zero-point row sums) and 3 dense layers
    for line in ops:
        operands, result = line.split(":")[-1].split("->")
        assert operands.count("xi8>") == 2 and "xi32>" in result, line


def test_integer_weights_keep_the_mask(mlp):
    model, params, x = mlp
    qt = ptq(model, params, {}, QuantSpec(4, "asym", "channel", "minmax", act_bits=8), x[:256])
    im = from_quantized(model, qt, (20,), 10)
    assert set(im.layers) == set(params)
    for name, layer in im.layers.items():
        pruned = np.asarray(params[name]["kernel"]) == 0
        assert pruned.any(), name
        zp = np.broadcast_to(layer.zero_point, layer.q.shape)
        assert np.all(layer.q[pruned] == zp[pruned])  # real zero is the zero point


def test_unsupported_models_and_weights_only_tickets_fail_clearly(mlp):
    cfg = ExperimentConfig.from_dict({"model": {"name": "vgg11", "width": 0.125}}).model
    with pytest.raises(ValueError, match="layer 'conv_0' is followed by batch norm 'bn_0'"):
        layer_program(build_model(cfg, 10, (32, 32, 3)))
    model, params, x = mlp
    qt = ptq(model, params, {}, QuantSpec(8), x[:64])
    with pytest.raises(ValueError, match="needs activation quantizers"):
        from_quantized(model, qt, (20,), 10)

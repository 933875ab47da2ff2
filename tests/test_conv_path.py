"""lth's CPU convolution path (batch pieces, im2col + matmul on images smaller than the kernel) equals
``lax.conv_general_dilated`` and its jax gradients within float tolerance; with batch norm in train and
eval mode, and on a pruned kernel whose pruned weights stay zero through a train step."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lth import models
from lth.models import _bn, conv_chunk, conv_path, loop_friendly_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _stock(lhs, rhs, window_strides, padding, **kw):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)


class ConvBN(nn.Module):
    """conv (SAME, as lth's models) -> batch norm -> ReLU -> 2x2 max-pool -> conv, with a chosen conv
    function; ``stock``: flax's BatchNorm and max_pool instead of lth's CPU ones."""

    conv: object
    strides: int
    stock: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(6, (3, 3), strides=(self.strides, self.strides), padding="SAME", use_bias=False,
                    conv_general_dilated=self.conv, name="conv_0")(x)
        if self.stock:
            x = nn.max_pool(nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                                 name="bn_0")(x)), (2, 2), strides=(2, 2))
        else:
            x = models._max_pool(nn.relu(_bn(train, "bn_0")(x)))
        x = nn.Conv(4, (3, 3), padding="SAME", conv_general_dilated=self.conv, name="conv_1")(x)
        return jnp.mean(x, axis=(1, 2))


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 2 examples on these tiny images, so the chunked path really runs."""
    monkeypatch.setenv("LTH_CPU_CONV_CHUNK_PIXELS", "1")


def test_the_chunk_rule_and_the_path_are_visible(monkeypatch):
    monkeypatch.setenv("LTH_CPU_CONV_CHUNK_PIXELS", "2048")
    assert conv_chunk(128, 32, 32) == 32  # at most 4 pieces (compile time)
    assert conv_chunk(128, 4, 4) == 128 and conv_chunk(256, 4, 4) == 128
    assert conv_chunk(20, 4, 4) == 20  # a whole batch under the limit: one piece
    assert "2048" in conv_path("cpu") and "lax.conv_general_dilated" in conv_path("gpu")
    monkeypatch.setenv("LTH_CPU_CONV_CHUNK_PIXELS", "0")
    assert conv_chunk(128, 32, 32) == 128 and "whole batch" in conv_path("cpu")
    monkeypatch.setenv("LTH_CPU_CONV_CHUNK_PIXELS", "lots")
    with pytest.raises(ValueError, match="LTH_CPU_CONV_CHUNK_PIXELS='lots'.*whole number"):
        conv_chunk(8, 4, 4)


@pytest.mark.parametrize("size, kernel, strides", [(6, 3, 1), (7, 3, 2), (6, 1, 2), (2, 3, 1), (2, 3, 2), (1, 3, 1)])
def test_chunked_and_gemm_conv_equal_lax_conv_forward_and_gradients(small_pieces, size, kernel, strides):
    """Forward and gradients wrt inputs and kernel; sizes 2 and 1 take the im2col + matmul path."""
    rng = np.random.default_rng(size + kernel + strides)
    x = jnp.asarray(rng.normal(size=(5, size, size, 3)), jnp.float32)  # a limit of 1 pixel: pieces of 1 example
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 4)), jnp.float32)
    assert conv_chunk(5, size, size) < 5

    def loss(conv, x, w):
        y = conv(x, w, (strides, strides), "SAME", dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y)), y

    (v, y), g = jax.value_and_grad(functools.partial(loss, loop_friendly_conv), (0, 1), has_aux=True)(x, w)
    (rv, ry), rg = jax.value_and_grad(functools.partial(loss, _stock), (0, 1), has_aux=True)(x, w)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, rg):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides", [1, 2])
def test_conv_batch_norm_net_equals_stock_in_train_and_eval_and_keeps_pruned_weights_zero(small_pieces, strides):
    rng = np.random.default_rng(strides)
    x = jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, 6))
    ours, stock = ConvBN(loop_friendly_conv, strides), ConvBN(_stock, strides, stock=True)
    variables = ours.init(jax.random.key(0), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    mask = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.5, p.dtype) if p.ndim == 4
                        else jnp.ones_like(p), params)
    params = jax.tree.map(jnp.multiply, params, mask)
    tx = optax.adam(1e-2)

    def step(model, params, opt):
        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, upd)

        (value, (logits, upd)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        grads = jax.tree.map(jnp.multiply, grads, mask)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), upd["batch_stats"], logits, grads

    new, new_stats, logits, grads = jax.jit(functools.partial(step, ours))(params, tx.init(params))
    r_new, r_stats, r_logits, r_grads = jax.jit(functools.partial(step, stock))(params, tx.init(params))
    for a, b in zip(jax.tree.leaves((logits, grads, new, new_stats)), jax.tree.leaves((r_logits, r_grads, r_new, r_stats))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for p, m in zip(jax.tree.leaves(new), jax.tree.leaves(mask)):
        assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0)  # pruned weights stay exactly zero
    ev, r_ev = (m.apply({"params": new, "batch_stats": new_stats}, x, train=False) for m in (ours, stock))
    np.testing.assert_allclose(ev, r_ev, rtol=1e-4, atol=1e-5)


def test_fused_batch_norm_equals_flax_batch_norm_in_train_and_eval_mode():
    """Same variables (names, shapes, initial values), outputs, running-average update and gradients
    wrt inputs, scale and bias (the batch statistics' own cotangents included) as flax's BatchNorm."""
    from lth.batchnorm import FusedBatchNorm

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1.0, 2.0, (6, 5, 5, 4)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    stock = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    ours = FusedBatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    v_stock, v_ours = stock.init(jax.random.key(0), x), ours.init(jax.random.key(0), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_stock)  # stored runs load unchanged
    for a, b in zip(jax.tree.leaves(v_ours), jax.tree.leaves(v_stock)):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    variables = jax.tree.map(lambda a: a + jnp.asarray(rng.uniform(0.1, 0.5, a.shape), jnp.float32), v_stock)

    def loss(module, params, x):
        y, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
        stats = upd["batch_stats"]
        return jnp.sum(jnp.sin(y) * dy) + jnp.sum(stats["mean"] ** 2) + jnp.sum(jnp.cos(stats["var"])), (y, stats)

    results = [jax.value_and_grad(functools.partial(loss, m), (0, 1), has_aux=True)(variables["params"], x)
               for m in (ours, stock)]
    for a, b in zip(*(jax.tree.leaves(r) for r in results)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    evals = [m.apply(variables, x) for m in (ours.copy(use_running_average=True), stock.copy(use_running_average=True))]
    np.testing.assert_allclose(evals[0], evals[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 6, 6, 4), (2, 7, 5, 3)])
def test_reshape_max_pool_equals_flax_max_pool_bitwise_with_ties(shape):
    """Forward and gradient identical to ``nn.max_pool`` (select-and-scatter: a window's gradient goes
    to its first maximum), on integer-valued inputs full of ties and odd sizes (a dropped row/column)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-2, 3, shape), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), jnp.float32)
    y, back = jax.vjp(models.max_pool_2x2, x)
    ry, r_back = jax.vjp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), x)
    assert np.array_equal(y, ry) and np.array_equal(back(dy)[0], r_back(dy)[0])
    assert "max_pool_2x2" in conv_path("cpu") and "FusedBatchNorm" in conv_path("cpu")


def test_models_on_the_cpu_path_keep_flax_batch_norm_variables(monkeypatch):
    """VGG and ResNet built with lth's CPU batch norm have the params/batch_stats tree (names, shapes
    and dtypes) of the same models built with flax's BatchNorm, so stored runs load unchanged."""
    from lth.batchnorm import FusedBatchNorm
    from lth.config import ModelConfig

    assert isinstance(models._bn(True, "bn"), FusedBatchNorm)
    for name in ("vgg11", "resnet20"):
        model = models.build_model(ModelConfig(name=name, width=0.125), 10, (32, 32, 3))
        ours = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
        with monkeypatch.context() as m:
            m.setattr(models, "_bn", lambda train, name: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                                                      epsilon=1e-5, name=name))
            stock = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
        assert jax.tree.structure(ours) == jax.tree.structure(stock)
        assert jax.tree.leaves(ours) == jax.tree.leaves(stock)  # ShapeDtypeStructs: shapes and dtypes

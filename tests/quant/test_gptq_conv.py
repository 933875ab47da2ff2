"""GPTQ of conv layers: a kernel [kh, kw, cin, out] is the matrix [out, kh*kw*cin] with im2col inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.prune.oneshot import reconstruction_error
from lth.quant import QuantSpec
from lth.quant.gptq import round_to_nearest
from lth.quant.gptq_net import check_gptq_model, gptq_population, layer_inputs_program
from lth.quant.numerics import qrange
from lth.quant.wiring import expand_groups

BITS = 3
CONVS = ("conv_0", "conv_1")


class TinyConv(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv_0")(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="VALID", name="conv_1")(x))
        return nn.Dense(10, name="output")(x.reshape(x.shape[0], -1))


def _matrix(kernel):
    return np.asarray(kernel).reshape(-1, np.shape(kernel)[-1]).T  # [out, kh*kw*cin]


@pytest.fixture(scope="module")
def conv_case():
    """A dense member and a 50%-masked one of a tiny conv net, smooth (correlated) calibration images."""
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(64, 3, 3, 2))
    x = jax.image.resize(jnp.asarray(coarse), (64, 9, 9, 2), "linear") + 0.1 * rng.normal(size=(64, 9, 9, 2))
    x = np.asarray(x, np.float32)
    model = TinyConv()
    params = jax.tree.map(np.asarray, model.init(jax.random.key(0), x[:1])["params"])
    mask = jax.tree.map(lambda p: np.abs(p) >= np.median(np.abs(p)) if p.ndim > 1 else np.ones(p.shape, bool), params)
    members = [params, jax.tree.map(lambda p, m: p * m, params, mask)]
    masks = [jax.tree.map(lambda p: np.ones(p.shape, bool), params), mask]
    stack = lambda ts: jax.tree.map(lambda *a: np.stack(a), *ts)  # noqa: E731
    return model, stack(members), stack(masks), x


@pytest.mark.parametrize("group_size", [None, 6])
def test_gptq_quantizes_conv_kernels_on_their_grid_below_rounding_error_with_masks_kept(conv_case, group_size):
    model, params, masks, x = conv_case
    check_gptq_model(jax.tree.map(lambda a: a[0], params))  # 2-D convs are accepted now
    qts, masks_out = gptq_population(model, params, {}, masks, QuantSpec(BITS, act_bits=None), x,
                                     group_size=group_size, return_masks=True)
    qmin, qmax = qrange(BITS, "sym")
    for k, qt in enumerate(qts):
        one = jax.tree.map(lambda a: jnp.asarray(a)[None], qt.params)
        for layer in CONVS:
            kernel = np.asarray(qt.params[layer]["kernel"])
            m = np.asarray(masks[layer]["kernel"][k])
            # masks kept: exactly 0 where pruned, the returned mask is the member's
            assert np.all(kernel[~m] == 0.0) and np.array_equal(masks_out[layer]["kernel"][k], m)
            # on the grid: per output channel, or per group of `group_size` of the kh*kw*cin inputs
            qp = qt.weight_qparams[layer]
            if group_size is None:
                assert np.shape(qp["scale"]) == (kernel.shape[-1],)
            else:
                fan_in = int(np.prod(kernel.shape[:-1]))
                assert np.shape(qp["scale"]) == (-(-fan_in // group_size), kernel.shape[-1])
            scale, _ = expand_groups(qp, kernel.shape)
            codes = kernel / np.asarray(scale)
            assert np.allclose(codes, np.round(codes), atol=1e-3) and codes.min() >= qmin - 1e-3 \
                and codes.max() <= qmax + 1e-3
            # the layer's error on the im2col inputs GPTQ saw (earlier layers quantized) <= round-to-nearest's
            r = np.asarray(layer_inputs_program(model, layer, None)(one, {}, jnp.asarray(x))[0])
            assert r.shape == (kernel[..., 0].size,) * 2  # the Gram root of the im2col rows
            w = _matrix(params[layer]["kernel"][k])
            e_gptq = reconstruction_error(w, _matrix(kernel), r)
            e_rtn = reconstruction_error(w, round_to_nearest(w, bits=BITS, group_size=group_size), r)
            assert e_gptq < e_rtn, (k, layer, e_gptq, e_rtn)


def test_gram_root_inputs_give_the_im2col_error():
    # ||W X^T - W' X^T||^2 from the Gram root equals it from the im2col rows themselves
    from lth.prune.oneshot_net import conv_patches, gram_root
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.normal(size=(4, 7, 7, 3)), jnp.float32)
    rows = conv_patches(nn.Conv(5, (3, 3)), a)
    w, w2 = rng.normal(size=(5, 27)), rng.normal(size=(5, 27))
    assert reconstruction_error(w, w2, gram_root(rows)) == pytest.approx(reconstruction_error(w, w2, rows), rel=1e-4)

"""Bit widths as traced values (lth.quant.numerics.grid_of): one compiled program for every multi-bit
width, with results bit-identical (``==``, not allclose) to the programs with the bits as constants."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.compiles import counting
from lth.quant.numerics import calibrate, fake_quant, grid_of, lsq_fake_quant, qrange

BITS = (2, 3, 8)  # 3: a width whose reciprocal 1/qmax is inexact in float32 (sym 1/3)


def _weights(shape=(37, 11), seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, shape).astype(np.float32)
    w[rng.random(shape) < 0.3] = 0.0  # pruned weights
    w[:, 3] = 0.0  # an all-zero (fully pruned) channel
    w[0, 0] = 0.4  # an outlier
    return w


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), np.max(np.abs(x.astype(np.float64) - y))


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_calibrate_and_fake_quant_equal_the_constant_bits(scheme):
    """Every calibration (minmax, percentile, mse) and granularity, quantizer and straight-through
    gradient: the traced grid gives exactly the constant-bits numbers, at every multi-bit width."""
    w = jnp.asarray(_weights())
    valid = w != 0
    settings = [(m, g) for m in ("minmax", "percentile", "mse") for g in ("channel", "tensor")]

    def run(x, bits, grid):
        out = []
        for method, granularity in settings:
            qp = calibrate(x, x != 0, bits, scheme, method, granularity, 99.9, grid=grid)
            fq = lambda y, qp=qp: fake_quant(y, qp["scale"], qp["zero_point"], bits, scheme, grid)  # noqa: E731
            # the straight-through gradient too: 1 inside the representable range, 0 outside
            out.append((qp, fq(x), jax.grad(lambda y: jnp.sum(fq(y) * y))(x)))
        return out

    traced = jax.jit(lambda x, g: run(x, 8, g))
    for bits in BITS:
        const = jax.jit(lambda x, b=bits: run(x, b, None))(w)
        got = traced(w, grid_of(bits, scheme))
        _same(const, got)
        for _, q, _ in got:
            assert bool(jnp.all(jnp.where(valid, True, q == 0)))  # pruned zeros stay 0


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_lsq_with_a_host_grad_scale_equals_the_constant_one(scheme):
    w = jnp.asarray(_weights((20, 9), seed=1))
    zp = jnp.zeros((9,), jnp.float32) if scheme == "sym" else jnp.full((9,), 3.0, jnp.float32)
    log_s = jnp.log(jnp.full((9,), 0.01, jnp.float32))

    def loss(x, ls, bits, gs, grid):
        return jnp.sum(lsq_fake_quant(x, ls, zp, bits, scheme, gs, grid) ** 2)

    traced = jax.jit(jax.value_and_grad(lambda x, ls, gs, g: loss(x, ls, 8, gs, g), argnums=(0, 1)))
    for bits in BITS:
        qmax = max(qrange(bits, scheme)[1], 1)
        gs = 1.0 / math.sqrt(20 * qmax)  # LSQ's 1 / sqrt(N Qp), a Python float (float64) as today
        const = jax.jit(jax.value_and_grad(lambda x, ls, b=bits, gs=gs: loss(x, ls, b, gs, None), argnums=(0, 1)))
        _same(const(w, log_s), traced(w, log_s, np.float32(gs), grid_of(bits, scheme)))


def test_one_program_serves_every_bit_width():
    w = jnp.asarray(_weights())
    f = jax.jit(lambda x, g: calibrate(x, x != 0, 8, "sym", "minmax", "channel", grid=g))
    f(w, grid_of(8, "sym"))
    with counting() as c:
        for bits in (2, 4, 8):
            f(w, grid_of(bits, "sym"))
    assert c.compiles + c.hits == 0, c.by_name


def test_binary_has_no_grid():
    with pytest.raises(ValueError, match="binary"):
        grid_of(1, "sym")


@pytest.mark.parametrize("learned_scale", [False, True])
def test_qat_forward_and_gradients_equal_the_constant_bits_model(learned_scale):
    """The QAT model fake_quant_model builds (bits as data in batch_stats["quant"]["w_grid"], one program)
    computes exactly what a FakeQuantModel with the bits as constants computes: outputs and gradients."""
    from lth.models import MLP
    from lth.quant import QuantSpec, ptq_population, qat_variables
    from lth.quant.wiring import FakeQuantModel, fake_quant_model
    from helpers import random_params

    model = MLP((24, 16), 4)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p * (rng.random(p.shape) < 0.6) if p.ndim == 2 else p,
                          random_params(model, (12,)))
    x = rng.normal(size=(64, 12)).astype(np.float32)
    y = jnp.asarray(np.arange(64) % 4)
    weights = "lsq" if learned_scale else "fixed"

    @functools.partial(jax.jit, static_argnums=0)  # one compile per model: the traced one is shared
    def loss_and_grad(fq, qp, qb):
        def loss(p):
            out = fq.apply({"params": p, "batch_stats": qb}, x)
            return jnp.mean(jax.nn.log_softmax(out)[jnp.arange(64), y])
        return jax.value_and_grad(loss)(qp)

    programs = set()
    for bits, scheme in ((2, "sym"), (8, "sym"), (4, "asym")):
        spec = QuantSpec(bits, scheme, "channel", "minmax", act_bits=8)
        qt = ptq_population(model, jax.tree.map(lambda a: jnp.asarray(a)[None], params), {}, spec, x)[0]
        qp, qb = qat_variables(qt, params, learned_scale)
        traced = fake_quant_model(model, spec, weights)
        assert traced.traced and "w_grid" in qb["quant"]
        programs.add((id(traced), scheme))
        const_b = {**qb, "quant": {k: v for k, v in qb["quant"].items() if not k.startswith("w_gr")}}
        _same(loss_and_grad(FakeQuantModel(model, spec, weights), qp, const_b), loss_and_grad(traced, qp, qb))
    assert len(programs) == 2  # one model (so one compiled QAT program) per scheme, whatever the bits


@pytest.mark.parametrize("bits,scheme", [(1, "sym"), (2, "sym"), (8, "sym"), (4, "asym")])
def test_weight_codes_on_the_host_equal_the_jax_quantizer(bits, scheme):
    from lth.quant.numerics import quantize
    from lth.quant.wiring import weight_codes, weight_qparams
    from lth.quant import QuantSpec
    spec = QuantSpec(bits, scheme)
    params = {"dense_0": {"kernel": jnp.asarray(_weights()), "bias": jnp.zeros((11,), jnp.float32)}}
    qp = weight_qparams(params, spec)["dense_0"]
    want = np.asarray(jax.jit(lambda x: quantize(x, qp["scale"], qp["zero_point"], bits, scheme))(
        params["dense_0"]["kernel"])).astype(np.int32)
    got = weight_codes(params, {"dense_0": qp}, spec)["dense_0"]
    assert got.dtype == np.int32 and np.array_equal(got, want)


def test_a_population_at_another_bit_width_builds_no_program():
    """PTQ, QAT (and its float control's program) and evaluation of a population at 4 and 2 bits after 8
    bits: no program compiled or read from the cache (one program per step kind for every width)."""
    from lth.config import ExperimentConfig
    from lth.models import MLP
    from lth.quant import QuantSpec, ptq_population, qat
    from lth.quant.wiring import Evaluator
    from helpers import random_params
    from test_quant import synthetic_data

    model = MLP((24, 16), 4)
    data = synthetic_data(n=200)
    tcfg = ExperimentConfig.from_dict({"train": {"batch_size": 50, "lr": 3e-3}}).train
    params = random_params(model, (12,), density=0.5)
    masks = jax.tree.map(lambda p: np.asarray(p != 0) if p.ndim == 2 else np.ones(p.shape, bool), params)
    stack = lambda t: jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * 2), t)  # noqa: E731
    ev = Evaluator(data, 100)
    calib = data.x_train[:100]

    def run(bits):
        spec = QuantSpec(bits, "sym", "channel", "minmax", act_bits=8)
        qts = ptq_population(model, stack(params), stack({}), spec, calib)
        acc = ev.quantized(model, qts)["test"]
        frozen, _ = qat(model, data, tcfg, stack(params), stack({}), stack(masks), spec, calib, seeds=[0, 1],
                        steps=2, lr=1e-3)
        return qts, acc, ev.quantized(model, frozen)["test"]

    run(8)
    with counting() as c:
        qts, _, _ = run(2)
        run(4)
    assert c.compiles + c.hits == 0, (c.by_name, c.hits_by_name)
    codes = qts[0].codes()["dense_0"]
    assert set(np.unique(codes)) <= {-1, 0, 1}  # it did quantize at 2 bits

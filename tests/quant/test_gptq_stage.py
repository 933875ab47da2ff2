"""quant.method = gptq: GPTQ of a level's members in the quant stage (cells, masks, accuracy against
round-to-nearest PTQ, grouped scales in size_bytes, bad settings)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lth.config import ConfigError, QuantConfig
from lth.models import MLP
from lth.prune.oneshot import reconstruction_error
from lth.quant import QuantSpec, fake_quant_predict, ptq_population, quantize_run, read_cells, size_report
from lth.quant.gptq import round_to_nearest
from lth.quant.gptq_net import layer_inputs_program, gptq_population
from lth.quant.stage import cell_id, settings_of
from lth.quant.wiring import expand_groups
from lth.stored import StoredRun

from test_quant import TINY, write_store


def _stack(*trees):
    return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)


# ---------------------------------------------------------------------------- the stage

def test_gptq_rows_for_every_member_and_bits_with_masks_exactly_zero(tmp_path):
    path = write_store(tmp_path)
    g = quantize_run(path, [0, 1], (4, 2), ("gptq",))
    assert sorted(zip(g.level, g.arm, g.bits)) == [(0, "ticket", 2), (0, "ticket", 4), (1, "reinit", 2),
                                                  (1, "reinit", 4), (1, "ticket", 2), (1, "ticket", 4)]
    assert g.cell.nunique() == 6 and (g.method == "gptq").all() and (g.accuracy > 0).all()
    assert (g.granularity == "channel").all() and (g.group_size == 0).all() and (g.act_order == False).all()  # noqa
    assert len(read_cells(path / "level_001")) == 4  # written with checksummed markers, read back
    assert quantize_run(path, [0, 1], (4, 2), ("gptq",)).empty  # done cells are not recomputed
    # the gptq options are part of a gptq cell's key only: ptq cells are keyed as before
    base = QuantConfig(bits=(4,), method=("ptq", "gptq"))
    other = QuantConfig(bits=(4,), method=("ptq", "gptq"), group_size=16, act_order=True, gptq_damp=0.1)
    ids = lambda qc: {s.method: cell_id("r", 1, "ticket", s) for s in settings_of(qc)}  # noqa: E731
    assert ids(base)["ptq"] == ids(other)["ptq"] and ids(base)["gptq"] != ids(other)["gptq"]
    assert len({ids(base)["ptq"], ids(base)["gptq"]}) == 2


def test_gptq_keeps_the_mask_and_puts_kernels_on_their_grid(tmp_path):
    run = StoredRun.open(write_store(tmp_path))
    pop = run.population(1)
    for group in (None, 8):  # (per channel: the stage test's compiled programs)
        qts = gptq_population(pop.model, pop.params, pop.batch_stats, pop.masks, QuantSpec(4, act_bits=8),
                              run.calib_x(2), group_size=group, act_order=group is not None, member_batch=1)
        for k, qt in enumerate(qts):
            codes = qt.codes()
            for layer in ("dense_0", "dense_1", "output"):
                w, m = np.asarray(qt.params[layer]["kernel"]), pop.masks[layer]["kernel"][k]
                assert np.all(w[~m] == 0.0) and np.count_nonzero(w) > 0.3 * m.sum()
                s, _ = expand_groups(qt.weight_qparams[layer], w.shape)
                np.testing.assert_allclose(codes[layer] * np.broadcast_to(s, w.shape), w, rtol=1e-5, atol=1e-7)
                assert np.abs(codes[layer]).max() <= 7  # 4-bit symmetric narrow range


def test_sparsegpt_gptq_prunes_further_within_each_mask_and_reports_its_density(tmp_path):
    path = write_store(tmp_path)
    df = quantize_run(path, [0, 1], (4,), ("sparsegpt_gptq",), joint_density=0.3, write=False)
    assert sorted(zip(df.level, df.arm)) == [(0, "ticket"), (1, "reinit"), (1, "ticket")]
    assert np.allclose(df.density, 0.3, atol=0.01) and (df.method == "sparsegpt_gptq").all()
    run = StoredRun.open(path)
    pop = run.population(1)
    qts, masks = gptq_population(pop.model, pop.params, pop.batch_stats, pop.masks, QuantSpec(4, act_bits=8),
                                 run.calib_x(2), density=0.3, member_batch=1, return_masks=True)
    for k, qt in enumerate(qts):
        for layer in ("dense_0", "dense_1", "output"):
            new, old = masks[layer]["kernel"][k], pop.masks[layer]["kernel"][k]
            assert np.all(new <= old) and new.sum() == round(0.3 * new.size)
            assert np.all(np.asarray(qt.params[layer]["kernel"])[~new] == 0.0)
    with pytest.raises(ConfigError, match="quant.joint_density = 0.3 is a sparsegpt_gptq setting"):
        quantize_run(path, [1], (4,), ("gptq",), joint_density=0.3, write=False)


# ---------------------------------------------------------------------------- a trained MLP

@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP trained on correlated synthetic data (10 classes, 32 mixed features) and a 50%
    magnitude mask of its kernels, with the masked weights briefly fine-tuned."""
    rng = np.random.default_rng(0)
    d, classes = 32, 10
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    centers = rng.normal(size=(classes, d))

    def draw(n):
        y = rng.integers(0, classes, n).astype(np.int32)
        return ((centers[y] + 0.8 * rng.normal(size=(n, d))) @ mix).astype(np.float32), y

    (xt, yt), (xs, ys) = draw(1000), draw(1000)
    model = MLP((64, 32), classes)
    params = model.init(jax.random.key(0), jnp.zeros((1, d)))["params"]
    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s, m):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply({"params": p}, xt), yt).mean()
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return jax.tree.map(lambda a, b, k: (a + b) * k, p, u, m), s

    ones = jax.tree.map(jnp.ones_like, params)
    state = opt.init(params)
    for _ in range(200):
        params, state = step(params, state, ones)
    mask = jax.tree.map(lambda p: (jnp.abs(p) >= jnp.median(jnp.abs(p))) if p.ndim == 2 else jnp.ones_like(p, bool),
                        params)
    sparse = jax.tree.map(lambda p, m: p * m, params, mask)
    state = opt.init(sparse)
    for _ in range(50):
        sparse, state = step(sparse, state, jax.tree.map(lambda m: m.astype(jnp.float32), mask))
    masks = _stack(jax.tree.map(lambda m: np.ones(m.shape, bool), mask), mask)
    return model, _stack(params, sparse), masks, xt[:480], (xs, ys)


BITS = 3


@pytest.fixture(scope="module")
def gptq_mlp(trained_mlp):
    model, params, masks, calib, _ = trained_mlp
    return gptq_population(model, params, {}, masks, QuantSpec(BITS, act_bits=8), calib, member_batch=1)


def test_gptq_beats_round_to_nearest_ptq_on_a_trained_mlp(trained_mlp, gptq_mlp):
    model, params, masks, calib, (xs, ys) = trained_mlp
    bits, gq = BITS, gptq_mlp
    rtn = ptq_population(model, params, {}, QuantSpec(bits, act_bits=8), calib, member_batch=1)
    for k in range(2):  # the dense network and the 50% ticket
        acc = lambda qt: float(np.mean(fake_quant_predict(model, qt, xs) == ys))  # noqa: E731
        assert acc(gq[k]) >= acc(rtn[k]) - 0.01, (k, acc(gq[k]), acc(rtn[k]))
        # each layer's reconstruction error on the inputs GPTQ saw (earlier layers already quantized)
        one = jax.tree.map(lambda a: jnp.asarray(a)[None], gq[k].params)
        for layer in ("dense_0", "dense_1", "output"):
            x = np.asarray(layer_inputs_program(model, layer, None)(one, {}, jnp.asarray(calib))[0])
            w = np.asarray(params[layer]["kernel"][k]).T
            e_gptq = reconstruction_error(w, np.asarray(gq[k].params[layer]["kernel"]).T, x)
            e_rtn = reconstruction_error(w, round_to_nearest(w, bits=bits), x)
            assert e_gptq <= e_rtn, (k, layer, e_gptq, e_rtn)
        m = masks["dense_0"]["kernel"][k]
        assert np.all(np.asarray(gq[k].params["dense_0"]["kernel"])[~m] == 0.0)


# ---------------------------------------------------------------------------- sizes and settings

def test_grouped_scales_add_exactly_their_bytes_to_size_bytes(gptq_mlp):
    for scheme, per_scale in (("sym", 4), ("asym", 5)):  # float32 scale (+ uint8 zero point)
        qt = dataclasses.replace(gptq_mlp[1], spec=gptq_mlp[1].spec.replace(scheme=scheme))
        base = size_report(qt)
        for g in (16, 8):
            # the same codes with the per-channel quantizer repeated per group of g inputs
            wq = {}
            for key, qp in qt.weight_qparams.items():
                fan_in = qt.params[key]["kernel"].shape[0]
                groups = -(-fan_in // g)
                wq[key] = {"scale": np.repeat(np.asarray(qp["scale"])[None], groups, 0),
                           "zero_point": np.repeat(np.asarray(qp["zero_point"])[None], groups, 0),
                           "group_index": np.arange(fan_in) // g}
            grouped = size_report(type(qt)(qt.spec, qt.params, qt.batch_stats, wq, qt.act_qparams))
            extra = sum((-(-qt.params[k]["kernel"].shape[0] // g) - 1) * qt.params[k]["kernel"].shape[1] * per_scale
                        for k in wq)
            assert grouped["size_bytes"] - base["size_bytes"] == extra
            # act-order: the groups are no longer runs of inputs, so each input's group is stored too
            for key in wq:
                wq[key]["group_index"] = wq[key]["group_index"][::-1].copy()
            shuffled = size_report(type(qt)(qt.spec, qt.params, qt.batch_stats, wq, qt.act_qparams))
            index = sum(-(-qt.params[k]["kernel"].shape[0] * int(np.ceil(np.log2(-(-qt.params[k]["kernel"].shape[0]
                                                                                   // g)))) // 8) for k in wq)
            assert shuffled["size_bytes"] - grouped["size_bytes"] == index


def test_bad_gptq_settings_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"quant.group_size = 0 is not allowed; expected an integer >= 1"):
        QuantConfig.from_dict({"method": ["gptq"], "group_size": 0})
    with pytest.raises(ConfigError, match=r"quant.gptq_damp = 0 is not allowed; expected a number in \(0, 1\]"):
        QuantConfig.from_dict({"method": ["gptq"], "gptq_damp": 0})
    path = write_store(tmp_path)
    with pytest.raises(ConfigError, match=r"quant.group_size = 64 is a GPTQ setting, but quant.method = \['ptq'\]"):
        quantize_run(path, [1], (4,), ("ptq",), group_size=64, write=False)
    with pytest.raises(ConfigError, match=r"quant.act_order = True is a GPTQ setting"):
        quantize_run(path, [1], (4,), ("ptq",), act_order=True, write=False)
    with pytest.raises(ConfigError, match="GPTQ needs bits >= 2"):
        quantize_run(path, [1], (4, 1), ("gptq",), write=False)
    from lth.config import ExperimentConfig
    conv = {**TINY, "quant": {"method": ["gptq"]}}  # the layers below stand for a conv net's
    from lth.config import check_against_model
    # conv layers are GPTQ-quantized as [out, kh*kw*cin] with im2col inputs (test_gptq_conv): no refusal
    check_against_model(ExperimentConfig.from_dict(conv), {"conv_0": "conv", "dense_0": "dense"}, 60)

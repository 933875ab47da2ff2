"""Quantizer, calibration, PTQ (bias correction, CLE), QAT and the quantize_run sweep, on tiny networks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lth.config import ConfigError, ExperimentConfig
from lth.data import Dataset, load_dataset
from lth.models import MLP, build_model
from lth.quant import (QuantConfig, QuantSpec, bias_correct, calibrate, equalize, fake_quant, layer_outputs,
                       lsq_fake_quant, ptq, ptq_population, qat, quantize, quantize_member, quantize_run,
                       quantize_weights, read_cells, representable_range, scale_zero_point, weight_qparams)
from lth.stored import StoredRun
from lth.store import RunStore, tree_bytes

from helpers import random_params


def sparse_kernel(rng, shape, density=0.4):
    w = rng.normal(size=shape).astype(np.float32)
    return w * (rng.random(shape) < density)


# ---------------------------------------------------------------------------- the quantizer

@pytest.mark.parametrize("lo, hi, bits, scheme, scale, zero_point", [
    (-1.0, 2.0, 8, "sym", 2 / 127, 0),
    (-1.0, 2.0, 8, "asym", 3 / 255, 85),  # Z = round(1 / (3/255)) = 85
    (0.5, 2.0, 4, "asym", 2 / 15, 0),  # range widened to [0, 2]
    (-3.0, -1.0, 8, "asym", 3 / 255, 255),  # range widened to [-3, 0]
    (-0.5, 1.0, 2, "sym", 1.0, 0),  # ternary: qmax = 1
    (-0.4, 0.7, 4, "asym", 1.1 / 15, 5),  # 0.4 / (1.1/15) = 5.45 -> 5
    (0.0, 0.0, 8, "asym", 1.0, 0),  # an all-zero (fully pruned) range
])
def test_scale_and_zero_point_match_hand_computed_values(lo, hi, bits, scheme, scale, zero_point):
    s, z = scale_zero_point(lo, hi, bits, scheme)
    assert float(s) == pytest.approx(scale, rel=1e-6)
    assert float(z) == zero_point


def test_calibrate_per_channel_min_max_and_binary_by_hand():
    w = jnp.array([[1.0, -4.0], [-2.0, 0.0], [0.5, 2.0]])  # [in=3, out=2]
    qp = calibrate(w, w != 0, 8, "sym", "minmax", "channel")
    np.testing.assert_allclose(qp["scale"], [2 / 127, 4 / 127], rtol=1e-6)
    qp = calibrate(w, w != 0, 8, "asym", "minmax", "tensor")
    assert float(qp["scale"]) == pytest.approx(6 / 255) and float(qp["zero_point"]) == 170  # 4 / (6/255)
    qp = calibrate(w, w != 0, 1, "sym", "minmax", "channel")  # binary: mean |w| of the non-zeros
    np.testing.assert_allclose(qp["scale"], [3.5 / 3, 3.0], rtol=1e-6)
    assert np.asarray(quantize(w, qp["scale"], qp["zero_point"], 1, "sym")).tolist() == [[1, -1], [-1, 0], [1, 1]]


def test_percentile_and_mse_clip_an_outlier():
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([rng.normal(size=5000), [40.0]]).astype(np.float32))
    ones = jnp.ones_like(x, bool)
    mm = calibrate(x, ones, 4, "sym", "minmax", "tensor")
    pc = calibrate(x, ones, 4, "sym", "percentile", "tensor", 99.9)
    ms = calibrate(x, ones, 4, "sym", "mse", "tensor")
    assert float(mm["scale"]) == pytest.approx(40 / 7)
    assert float(pc["scale"]) < 0.2 * float(mm["scale"]) and float(ms["scale"]) < 0.5 * float(mm["scale"])
    err = lambda qp: float(jnp.mean((fake_quant(x, qp["scale"], qp["zero_point"], 4, "sym") - x) ** 2))  # noqa: E731
    assert err(ms) < err(mm)


@pytest.mark.parametrize("bits, scheme, granularity", [
    (8, "sym", "channel"), (8, "asym", "tensor"), (4, "sym", "tensor"), (4, "asym", "channel"),
    (3, "sym", "channel"), (3, "asym", "tensor"), (2, "sym", "tensor"), (2, "asym", "channel")])
def test_quantize_dequantize_error_is_at_most_half_a_step_inside_the_range(bits, scheme, granularity):
    rng = np.random.default_rng(bits)
    w = jnp.asarray(rng.normal(size=(50, 6)).astype(np.float32) * np.arange(1, 7))
    qp = calibrate(w, w != 0, bits, scheme, "minmax", granularity)
    err = jnp.abs(fake_quant(w, qp["scale"], qp["zero_point"], bits, scheme) - w)
    lo, hi = representable_range(qp["scale"], qp["zero_point"], bits, scheme)
    inside = (w >= lo) & (w <= hi)
    half = jnp.broadcast_to(qp["scale"] / 2 * (1 + 1e-5), w.shape)
    assert float(jnp.mean(inside)) > 0.8
    assert bool(jnp.all(jnp.where(inside, err <= half, True)))
    # the range misses the observed min/max by at most S/2 (float rounding, or asym's integer Z)
    assert bool(jnp.all(err <= half))
    assert float(jnp.max(err)) > 0  # and it does quantize


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_ste_gradient_is_identity_inside_the_range_and_zero_outside(scheme):
    scale, zp = scale_zero_point(-1.0, 1.0, 4, scheme)
    lo, hi = representable_range(scale, zp, 4, scheme)
    x = jnp.array([-5.0, float(lo) - 0.01, -0.33, 0.0, 0.41, float(hi) - 1e-3, float(hi) + 0.01, 7.0])
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, scale, zp, 4, scheme) * jnp.arange(1.0, 9.0)))(x)
    inside = (x >= lo) & (x <= hi)
    np.testing.assert_array_equal(g, jnp.where(inside, jnp.arange(1.0, 9.0), 0.0))
    assert inside.sum() == 4 and (~inside).sum() == 4
    gs = jax.grad(lambda s: jnp.sum(fake_quant(x, s, zp, 4, scheme)))(scale)
    assert float(gs) == 0.0  # fixed ranges: the scale is not trained through the STE


def test_lsq_gradients_follow_esser_et_al():
    s = 0.1
    x = jnp.array([0.234, -0.04, 0.9, -2.0])  # 4-bit sym: qmax = 7, range [-0.7, 0.7]
    gx = jax.grad(lambda x: jnp.sum(lsq_fake_quant(x, jnp.log(s), 0.0, 4, "sym")))(x)
    np.testing.assert_array_equal(gx, [1.0, 1.0, 0.0, 0.0])
    gl = jax.grad(lambda ls: jnp.sum(lsq_fake_quant(x, ls, 0.0, 4, "sym")))(jnp.log(s))
    # d/ds: round(x/s) - x/s inside, qmax / qmin outside (Esser et al. 2020, Eq. 3); d/dlog s = s d/ds
    per = [round(0.234 / s) - 0.234 / s, round(-0.04 / s) - (-0.04 / s), 7.0, -7.0]
    assert float(gl) == pytest.approx(s * sum(per), rel=1e-4)


# every bit width x scheme; granularities and calibrations alternate (each compiled case costs ~1 s)
ZERO_CASES = [(b, s, ("channel", "tensor")[i % 2], ("minmax", "percentile", "mse")[i % 3])
              for i, (b, s) in enumerate((b, s) for b in (8, 4, 3, 2, 1) for s in ("sym", "asym"))]


@pytest.mark.parametrize("bits, scheme, granularity, calibration", ZERO_CASES)
def test_pruned_weights_stay_exactly_zero(bits, scheme, granularity, calibration):
    rng = np.random.default_rng(bits)
    params = {"dense_0": {"kernel": jnp.asarray(sparse_kernel(rng, (30, 8)) + 0.3), "bias": jnp.ones(8)},
              "output": {"kernel": jnp.asarray(sparse_kernel(rng, (8, 3))), "bias": jnp.zeros(3)}}
    params["dense_0"]["kernel"] = params["dense_0"]["kernel"].at[:, 2].set(0.0)  # a fully pruned channel
    params["dense_0"]["kernel"] = params["dense_0"]["kernel"] * (rng.random((30, 8)) < 0.5)
    spec = QuantSpec(bits, scheme, granularity, calibration)
    q = quantize_weights(params, weight_qparams(params, spec), spec)
    for layer in ("dense_0", "output"):
        w, wq = np.asarray(params[layer]["kernel"]), np.asarray(q[layer]["kernel"])
        assert np.all(wq[w == 0] == 0.0)
        assert np.all(np.isfinite(wq)) and np.any(wq != 0)
    # activations: a zero input stays zero too (asymmetric ranges that do not contain 0)
    s, z = scale_zero_point(0.3, 5.0, 4 if bits == 1 else bits, scheme)
    assert float(fake_quant(jnp.zeros(()), s, z, 4 if bits == 1 else bits, scheme)) == 0.0


# ---------------------------------------------------------------------------- PTQ helpers

@pytest.fixture(scope="module")
def tiny_mlp():
    rng = np.random.default_rng(0)
    model = MLP((24, 16), 4)
    params = random_params(model, (12,))
    params = jax.tree.map(lambda p: p * (rng.random(p.shape) < 0.6) if p.ndim == 2 else p + 0.05, params)
    x = (rng.normal(size=(1024, 12)) + 0.5).astype(np.float32)
    return model, params, x


def test_cross_layer_equalization_keeps_the_float_function_and_equalizes_ranges(tiny_mlp):
    model, params, x = tiny_mlp
    unbalanced = params["dense_0"]["kernel"] * jnp.linspace(0.1, 8, 24)
    params = {**params, "dense_0": {**params["dense_0"], "kernel": unbalanced}}
    eq = equalize(model, params)
    np.testing.assert_allclose(model.apply({"params": eq}, x), model.apply({"params": params}, x), rtol=1e-4, atol=1e-5)
    r1 = np.abs(np.asarray(eq["dense_0"]["kernel"])).max(0)
    r2 = np.abs(np.asarray(eq["dense_1"]["kernel"])).max(1)
    before = (np.abs(np.asarray(params["dense_0"]["kernel"])).max(0)
              / np.abs(np.asarray(params["dense_1"]["kernel"])).max(1))
    assert np.ptp(np.log(before)) > 2  # the ranges were unbalanced
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
    for layer in params:  # masks survive
        assert np.all(np.asarray(eq[layer]["kernel"])[np.asarray(params[layer]["kernel"]) == 0] == 0)


def test_cle_on_a_conv_net_keeps_the_float_function():
    cfg = ExperimentConfig.from_dict({"model": {"name": "conv2", "width": 0.125}}).model
    model = build_model(cfg, 10, (8, 8, 3))
    params = random_params(model, (8, 8, 3), 1)
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype(np.float32)
    eq = equalize(model, params)
    apply = jax.jit(lambda p: model.apply({"params": p}, x))
    np.testing.assert_allclose(apply(eq), apply(params), rtol=1e-4, atol=1e-5)
    assert not np.allclose(eq["conv_0"]["kernel"], params["conv_0"]["kernel"])


def test_bias_correction_reduces_the_output_mean_shift(tiny_mlp):
    model, params, x = tiny_mlp
    calib, held_out = x[:512], x[512:]
    spec = QuantSpec(3, "sym", "tensor", "minmax")
    plain = ptq(model, params, {}, spec, calib)
    corrected = ptq(model, params, {}, spec, calib, bias_correction=True)
    ref = layer_outputs(model, {"params": params}, held_out)["output"]
    def shift(qt):
        return np.abs(layer_outputs(model, {"params": qt.params}, held_out)["output"] - ref).mean()

    assert shift(corrected) < 0.5 * shift(plain)
    # only biases change; kernels stay on the same grid
    np.testing.assert_array_equal(corrected.params["output"]["kernel"], plain.params["output"]["kernel"])
    direct = bias_correct(model, params, {}, plain, calib)
    assert shift(direct) < 0.5 * shift(plain)


def test_activation_quantization_uses_calibrated_ranges(tiny_mlp):
    model, params, x = tiny_mlp
    qt = ptq(model, params, {}, QuantSpec(8, "sym", "channel", "minmax", act_bits=8), x[:256])
    assert set(qt.act_qparams) == {"dense_0", "dense_1", "output"}
    s0, z0 = float(qt.act_qparams["dense_0"]["scale"]), float(qt.act_qparams["dense_0"]["zero_point"])
    assert s0 == pytest.approx((x[:256].max() - x[:256].min()) / 255, rel=1e-5)
    assert z0 == round(-x[:256].min() / s0)
    assert float(qt.act_qparams["dense_1"]["zero_point"]) == 0  # ReLU outputs: the range starts at 0


# ---------------------------------------------------------------------------- QAT

def synthetic_data(n=600, d=12, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * 2
    def split(m):
        y = rng.integers(0, classes, m).astype(np.int32)
        return (centers[y] + rng.normal(size=(m, d))).astype(np.float32), y
    (xt, yt), (xv, yv), (xs, ys) = split(n), split(100), split(200)
    return Dataset("synthetic", xt, yt, xv, yv, xs, ys, classes)


def test_lsq_qat_keeps_pruned_weights_exactly_zero_and_trains(tiny_mlp, learned_scale=True):
    model, params, _ = tiny_mlp
    data = synthetic_data()
    tcfg = ExperimentConfig.from_dict({"train": {"batch_size": 50, "lr": 3e-3}}).train
    masks = jax.tree.map(lambda p: np.asarray(p != 0) if p.ndim == 2 else np.ones(p.shape, bool), params)
    stack = lambda t: jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * 2), t)  # noqa: E731
    spec = QuantSpec(2, "sym", "channel", "minmax", act_bits=4)
    qts, records = qat(model, data, tcfg, stack(params), stack({}), stack(masks), spec, data.x_train[:200],
                       seeds=[0, 1], steps=12, lr=3e-3, learned_scale=learned_scale)
    assert len(qts) == 2 and records
    for qt in qts:
        for layer in ("dense_0", "dense_1", "output"):
            w = np.asarray(qt.params[layer]["kernel"])
            assert np.all(w[~masks[layer]["kernel"]] == 0.0)
            assert np.any(w != np.asarray(ptq(model, params, {}, spec, data.x_train[:200]).params[layer]["kernel"]))
            # on the 2-bit grid: every weight is -s, 0 or +s of its channel
            s = np.asarray(qt.weight_qparams[layer]["scale"])
            assert np.all(np.isin(np.round(w / s).astype(int), [-1, 0, 1]))
            np.testing.assert_allclose(np.abs(w[w != 0]), np.broadcast_to(s, w.shape)[w != 0], rtol=1e-6)


# ---------------------------------------------------------------------------- the sweep on a stored run

TINY = {
    "name": "tinyq", "seeds": [0], "arms": ["ticket", "reinit"],
    "data": {"name": "mnist1d", "mnist1d_samples": 1000, "val_size": 100},
    "model": {"name": "mlp", "widths": [24, 16]},
    "train": {"optimizer": "adam", "lr": 3e-3, "batch_size": 50, "steps": 60, "eval_every": 60},
    "prune": {"levels": 1, "rate": 0.5, "output_rate": 0.2},
    "log": {"wandb": "disabled", "progress": False},
}


def write_store(root, raw=TINY):
    """A run folder in the store layout of lth.lottery (untrained weights: the plumbing is under test).

    Level 0: the dense ticket; level 1: the ticket (half its kernels pruned by magnitude) and a
    reinit control.
    """
    cfg = ExperimentConfig.from_dict(raw)
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    params = jax.tree.map(np.asarray, random_params(model, data.input_shape))
    store = RunStore(root, cfg.run_id)
    store.write_hparams({**cfg.to_dict(), "run_id": cfg.run_id, "lth_version": "test", "num_steps": 60})
    store.write_tree("init.msgpack", {"params": jax.tree.map(lambda a: a[None], params), "batch_stats": {}})
    ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    mask = jax.tree.map(lambda p: np.abs(p) >= np.median(np.abs(p)) if p.ndim == 2 else np.ones(p.shape, bool), params)
    pruned = jax.tree.map(lambda p, m: p * m, params, mask)
    for level, members, masks, finals in ((0, ["ticket"], [ones], [params]),
                                          (1, ["ticket", "reinit"], [mask, ones], [pruned, params])):
        stack = lambda ts: jax.tree.map(lambda *a: np.stack(a), *ts)  # noqa: E731
        store.write_level(level, {
            "members.json": json.dumps([{"arm": a, "seed": 0} for a in members]).encode(),
            "masks.msgpack": tree_bytes(stack(masks)),
            "final.msgpack": tree_bytes({"params": stack(finals), "batch_stats": {}}),
        })
    return store.path


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("qstore"))


def test_quantize_run_writes_one_cell_per_arm_and_setting(tmp_path):
    stored_run = write_store(tmp_path)
    df = quantize_run(stored_run, [1], (4,), ("ptq", "qat"), qat_steps=4)
    cols = ["run_id", "cell", "level", "arm", "seed", "density", "param_count", "bits", "scheme", "granularity",
            "calibration", "method", "accuracy", "float_accuracy", "size_bytes", "compression", "float_size_bytes"]
    assert all(c in df.columns for c in cols)
    assert len(df) == 6 and set(df.arm) == {"ticket", "reinit"}  # every arm, not only the ticket
    assert df.cell.nunique() == 6  # ptq, qat and QAT's float control (float_ft) per arm
    t = df[df.arm == "ticket"].sort_values("method")
    assert t.method.tolist() == ["float_ft", "ptq", "qat"] and t.qat_steps.tolist() == [4, 0, 4]
    assert t.density.iloc[0] == pytest.approx(0.5, abs=0.01) and df[df.arm == "reinit"].density.iloc[0] == 1.0
    q = df[df.method != "float_ft"]
    assert (q.compression > 1).all() and (q.size_bytes < q.fp32_dense_bytes).all()
    assert (q.size_bytes < q.float_size_bytes).all()
    table = read_cells(stored_run / "level_001")
    assert len(table) == 6
    # done cells are skipped: only the 8-bit cells and level 0 are new
    again = quantize_run(stored_run, [0, 1], (4, 8), ("ptq",))
    assert sorted(zip(again.level, again.bits, again.arm)) == [(0, 4, "ticket"), (0, 8, "ticket"),
                                                              (1, 8, "reinit"), (1, 8, "ticket")]
    table = read_cells(stored_run / "level_001")
    assert len(table) == 8 and sorted(set(zip(table.bits, table.method))) == [(4, "ptq"), (4, "qat"), (8, "ptq"),
                                                                              (32, "float_ft")]
    assert read_cells(stored_run / "level_000").density.tolist() == [1.0, 1.0]
    assert quantize_run(stored_run, [0, 1], (4, 8), ("ptq",)).empty  # nothing left to compute
    # a damaged cell is not used and is recomputed
    cell = again[(again.level == 1) & (again.arm == "ticket")].cell.iloc[0]
    victim = stored_run / "level_001" / "quant" / f"{cell}.parquet"
    victim.write_bytes(victim.read_bytes()[:-7])
    assert len(read_cells(stored_run / "level_001")) == 7
    redo = quantize_run(stored_run, [1], (8,), ("ptq",))
    assert redo.cell.tolist() == [cell] and len(read_cells(stored_run / "level_001")) == 8
    # QAT with fixed ranges (the same setting, so the compiled engine is reused) keeps the mask
    run = StoredRun.open(stored_run)
    qt, who = quantize_member(run, 1, QuantSpec(4, act_bits=8), method="qat", qc=QuantConfig(qat_steps=4))
    masks = run.population(1).masks
    for layer in ("dense_0", "dense_1", "output"):
        w, m = np.asarray(qt.params[layer]["kernel"]), masks[layer]["kernel"][0]
        assert np.all(w[~m] == 0.0) and np.count_nonzero(w) > 0.3 * m.sum()
    assert who == {"arm": "ticket", "seed": 0}
    r8 = again[(again.bits == 8) & (again.level == 1) & (again.arm == "ticket")].iloc[0]
    assert abs(r8.accuracy - r8.float_accuracy) <= 0.02
    assert r8.size_bytes > df[(df.arm == "ticket") & (df.method == "ptq")].size_bytes.iloc[0]


def test_batched_ptq_equals_ptq_of_each_member(stored_run):
    run = StoredRun.open(stored_run)
    pop = run.population(1)
    calib = run.calib_x(2)
    spec = QuantSpec(4, act_bits=8)
    together = ptq_population(pop.model, pop.params, pop.batch_stats, spec, calib)
    for k, qt in enumerate(together):
        alone = ptq(pop.model, jax.tree.map(lambda a: a[k], pop.params), {}, spec, calib)
        for a, b in zip(jax.tree.leaves((qt.params, qt.weight_qparams, qt.act_qparams)),
                        jax.tree.leaves((alone.params, alone.weight_qparams, alone.act_qparams))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        m = pop.masks["dense_0"]["kernel"][k]
        assert np.all(np.asarray(qt.params["dense_0"]["kernel"])[~m] == 0.0)


def test_retry_tries_calibrations_in_order_and_records_the_choice(stored_run):
    easy = quantize_run(stored_run, [1], (4,), ("ptq",), calibration=("minmax", "mse"), retry=True, arms=("ticket",),
                        tolerance=1.0, write=False)
    assert easy.calibration.tolist() == ["minmax"] and easy.calibration_tried.tolist() == ["minmax"]
    assert easy.calibration_requested.tolist() == ["minmax,mse"] and easy.retry.all()
    hard = quantize_run(stored_run, [1], (4,), ("ptq",), calibration=("minmax", "mse"), retry=True, arms=("ticket",),
                        tolerance=0.0, write=False)
    tried = hard.calibration_tried.iloc[0].split(",")
    assert tried[0] == "minmax" and hard.calibration.iloc[0] in tried
    # the first method is kept only if its val accuracy was within 0 points of float
    if tried == ["minmax"]:
        assert hard.val_accuracy.iloc[0] >= hard.float_val_accuracy.iloc[0]


def test_bad_quant_settings_fail_with_the_key_and_allowed_values(stored_run):
    with pytest.raises(ConfigError, match=r"quant.bits = \[5\].*8, 4, 3, 2, 1"):
        quantize_run(stored_run, [1], (5,), write=False)
    with pytest.raises(ConfigError, match="level.*7.*not complete"):
        quantize_run(stored_run, [7], (8,), write=False)
    with pytest.raises(ConfigError, match="unknown key quant.bitz"):
        QuantConfig.from_dict({"bitz": [8]})
    with pytest.raises(ConfigError, match="quant.arms.*small_dense.*its arms: ticket, reinit"):
        quantize_run(stored_run, [1], (8,), arms=("small_dense",), write=False)


def test_cli_quantize_prints_the_table(stored_run, capsys):
    from lth.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["quantize", str(stored_run), "--levels", "1", "--bits", "4", "--no-write",
                              "--arms", "ticket"])
    assert _run(args) == 0
    out = capsys.readouterr().out
    assert "compression" in out and "1 rows" in out and "accuracy (%)" in out
    args = parser.parse_args(["quantize", str(stored_run), "--levels", "1", "--no-write", "--set", "quant.bits=[8, 4]",
                              "--set", 'quant.arms=["ticket"]'])
    assert _run(args) == 0 and "2 rows" in capsys.readouterr().out
    assert _run(parser.parse_args(["quantize", str(stored_run), "--set", "train.lr=1"])) == 2
    assert "quant.* settings only" in capsys.readouterr().err
    assert _run(parser.parse_args(["quantize", str(stored_run), "--scheme", "sym,nope"])) == 2
    assert "quant.scheme" in capsys.readouterr().err


def _run(args) -> int:
    """A command of the ``lth`` table without main's error handling (so a test sees the exception)."""
    from lth.cli import COMMANDS
    return COMMANDS[args.command].run(args)

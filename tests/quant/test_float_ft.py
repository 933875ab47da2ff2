"""float_ft, QAT's float control: the same member fine-tuned in float with QAT's exact schedule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lth.config import ExperimentConfig
from lth.models import MLP
from lth.quant import QuantConfig, QuantSpec, fake_quant_model, float_ft, ptq, qat_variables, quantize_run
from lth.quant.stage import cells, float_ft_setting
from lth.stored import StoredRun
from lth.train import Engine

from helpers import random_params
from test_quant import synthetic_data, write_store

SPEC = QuantSpec(2, "sym", "channel", "minmax", act_bits=4)


@pytest.fixture(scope="module")
def sparse_mlp():
    rng = np.random.default_rng(0)
    model = MLP((24, 16), 4)
    params = random_params(model, (12,))
    params = jax.tree.map(lambda p: p * (rng.random(p.shape) < 0.5) if p.ndim == 2 else p, params)
    masks = jax.tree.map(lambda p: np.asarray(p != 0) if p.ndim == 2 else np.ones(p.shape, bool), params)
    return model, params, masks


@pytest.mark.parametrize("learned_scale", [False, True])
def test_quantization_switched_off_is_exactly_the_float_network_and_its_gradient(sparse_mlp, learned_scale):
    model, params, _ = sparse_mlp
    x = np.random.default_rng(1).normal(size=(64, 12)).astype(np.float32)
    y = jnp.asarray(np.arange(64) % 4)
    qp, qb = qat_variables(ptq(model, params, {}, SPEC, x), params, learned_scale)
    fq = fake_quant_model(model, SPEC, "lsq" if learned_scale else "fixed")

    def loss(net, on, apply):
        b = {**qb, "quant": {**qb["quant"], "on": jnp.float32(on)}}
        out = apply({"params": {**qp, "net": net}, "batch_stats": b}, x)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), out

    base = lambda v, x: model.apply({"params": v["params"]["net"]}, x)  # noqa: E731
    (l_off, out_off), g_off = jax.value_and_grad(loss, has_aux=True)(params, 0, fq.apply)
    (l_fl, out_fl), g_fl = jax.value_and_grad(loss, has_aux=True)(params, 0, base)
    np.testing.assert_array_equal(out_off, out_fl)
    jax.tree.map(np.testing.assert_array_equal, g_off, g_fl)
    (_, out_on), _ = jax.value_and_grad(loss, has_aux=True)(params, 1, fq.apply)
    assert np.abs(np.asarray(out_on) - np.asarray(out_fl)).max() > 1e-3  # switched on, it does quantize


def test_float_ft_is_masked_float_training_with_the_given_schedule(sparse_mlp):
    """float_ft (QAT's program, quantization off) trains exactly as the plain float engine does with the
    same steps, constant lr, batch order and start point; pruned weights stay exactly 0."""
    model, params, masks = sparse_mlp
    data = synthetic_data()
    tcfg = ExperimentConfig.from_dict({"train": {"batch_size": 50, "lr": 3e-3}}).train
    stack = lambda t: jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * 2), t)  # noqa: E731
    seeds, steps, lr = [0, 1], 12, 3e-3
    ft, _ = float_ft(model, data, tcfg, stack(params), stack({}), stack(masks), SPEC, data.x_train[:200],
                     seeds=seeds, steps=steps, lr=lr)
    cfg = dataclasses.replace(tcfg, steps=steps, epochs=None, eval_every=steps)
    engine = Engine(model, data, cfg, lr_fn=optax.constant_schedule(lr))
    rngs = jax.vmap(jax.random.wrap_key_data)(jnp.stack(
        [jax.random.key_data(jax.random.fold_in(jax.random.key(s), 7919)) for s in seeds]))
    state = engine.init(stack(params), stack({}), jax.tree.map(lambda m: jnp.asarray(m, bool), stack(masks)), rngs)
    plain = jax.device_get(engine.run(state, seeds, evaluate=False).state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ft["params"], plain)
    for layer in ("dense_0", "dense_1", "output"):
        w, m = np.asarray(ft["params"][layer]["kernel"]), masks[layer]["kernel"]
        assert np.all(w[:, ~m] == 0.0)  # pruned: exactly 0 for both members
        assert np.mean(w[:, m] != np.asarray(params[layer]["kernel"])[m]) > 0.5  # kept: fine-tuned
    assert not np.array_equal(ft["params"]["output"]["kernel"][0], ft["params"]["output"]["kernel"][1])  # own order


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A quant stage (PTQ and QAT at 4 bits) on a stored run with a ticket and a reinit arm, with every
    training engine's start (init) and run recorded."""
    root = write_store(tmp_path_factory.mktemp("ftstore"))
    calls, lines = [], []
    init, run = Engine.init, Engine.run

    def spy_init(self, params, batch_stats, masks, rngs, start=0):
        calls.append({"engine": self, "net": jax.device_get(params["net"]), "masks": jax.device_get(masks["net"]),
                      "on": np.asarray(batch_stats["quant"]["on"]), "rngs": np.asarray(jax.random.key_data(rngs))})
        return init(self, params, batch_stats, masks, rngs, start)

    def spy_run(self, state, data_seeds, **kw):
        calls[-1].update(seeds=list(data_seeds), kw=kw)
        return run(self, state, data_seeds, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "init", spy_init)
        mp.setattr(Engine, "run", spy_run)
        df = quantize_run(root, [1], (4,), ("ptq", "qat"), qat_steps=4, log=lines.append)
    return root, df, calls, lines


def test_float_ft_rows_exist_for_every_qat_member_with_its_schedule(staged):
    root, df, _, _ = staged
    qat, ft = df[df.method == "qat"], df[df.method == "float_ft"]
    key = ["level", "arm", "seed", "qat_start", "qat_steps", "qat_lr"]
    assert len(qat) == 2 and sorted(map(tuple, qat[key].values)) == sorted(map(tuple, ft[key].values))
    assert (ft.bits == 32).all() and (ft.qat_steps == 4).all() and (ft.qat_lr == 3e-3 / 10).all()
    assert (ft.accuracy != ft.float_accuracy).any()  # fine-tuned, not the float network again
    # keyed by what it depends on: the member and QAT's schedule, not the bits (one cell for every QAT setting)
    cfg = StoredRun.open(root).cfg
    ft_cells = lambda **kw: {c.id for c in cells(cfg, QuantConfig(method=("qat",), **kw), [1])  # noqa: E731
                             if c.setting.method == "float_ft"}
    assert ft_cells(bits=(4,), qat_steps=4) == ft_cells(bits=(8, 2), qat_steps=4, scheme=("asym",)) == set(ft.cell)
    assert ft_cells(bits=(4,), qat_steps=5).isdisjoint(ft_cells(bits=(4,), qat_steps=4))
    assert float_ft_setting(QuantConfig()).key() == {"bits": 32, "method": "float_ft", "qat_lr": None,
                                                     "qat_start": "trained", "qat_steps": None}
    # only the QAT members get one, and a rerun computes nothing
    assert not {c.setting.method for c in cells(cfg, QuantConfig(method=("ptq",)), [1])} & {"float_ft"}
    assert quantize_run(root, [1], (4,), ("ptq", "qat"), qat_steps=4).empty


def test_float_ft_runs_qats_program_with_qats_start_data_order_and_lr(staged):
    _, _, calls, _ = staged
    assert [c["on"].tolist() for c in calls] == [[0.0, 0.0], [1.0, 1.0]]  # float_ft first, then QAT
    ft, q = calls
    assert ft["engine"] is q["engine"]  # the same compiled programs, optimizer, steps and lr schedule
    assert q["engine"].cfg.steps == 4 and float(q["engine"].lr_fn(3)) == pytest.approx(3e-4)
    assert ft["seeds"] == q["seeds"] and ft["kw"] == q["kw"]  # the same batches
    np.testing.assert_array_equal(ft["rngs"], q["rngs"])
    jax.tree.map(np.testing.assert_array_equal, ft["net"], q["net"])  # the same start point
    jax.tree.map(np.testing.assert_array_equal, ft["masks"], q["masks"])  # the same mask


def test_quant_log_lines_name_the_arm_and_members_and_compare_qat_with_float_ft(staged):
    _, df, _, lines = staged
    assert len(lines) == 6  # (float_ft, ptq, qat) x (ticket, reinit): one line per arm, never averaged
    for arm in ("ticket", "reinit"):
        ft = df[(df.arm == arm) & (df.method == "float_ft")].accuracy.iloc[0]
        fl = df[(df.arm == arm) & (df.method == "ptq")].float_accuracy.iloc[0]
        qat_line = next(x for x in lines if f" {arm} qat 4-bit" in x)
        ptq_line = next(x for x in lines if f" {arm} ptq 4-bit" in x)
        assert "(1 member)" in qat_line and f"(float_ft {100 * ft:.2f}%)" in qat_line
        assert f"(float {100 * fl:.2f}%)" in ptq_line

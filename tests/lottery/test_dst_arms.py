"""Sparse-from-scratch arms (static, set, rigl): the engine's moving-mask hook on a tiny MLP (exact
counts and zeros at every step, RigL's grow by the dense gradient checked by hand, resume and population
equal to uninterrupted and alone) and a tiny lottery level (ERK budgets, stored masks, dst.parquet)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

from helpers import tiny
from lth.config import ConfigError
from lth.data import load_dataset
from lth.lottery.runner import Lottery, population_key
from lth.models import build_model, structure_of
from lth.prune.dst import RIGL, SET, STATIC, drop_fraction, layer_counts, make_mask_update, update_mask, update_steps
from lth.prune.masks import prunable
from lth.store import load_tree
from lth.train import Engine, init_population, stack, unstack
from lth.trees import seed_keys, to_numpy

DT, END, STEPS = 3, 15, 20


@pytest.fixture(scope="module")
def setup():
    cfg = tiny(seeds=[0], train={"steps": STEPS, "eval_every": 10})
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    params, bs = to_numpy(init_population(model, seed_keys([0]), data.input_shape))
    params, bs = unstack(params, 0), unstack(bs, 0)
    can = prunable(params, cfg.prune, structure_of(model))
    rng = np.random.default_rng(0)
    mask = jax.tree.map(lambda p, c: rng.random(p.shape) < 0.3 if c else np.ones(p.shape, bool), params, can)
    engine = Engine(model, data, cfg.train, mask_fn=make_mask_update(can, delta_t=DT, end_step=END, alpha=0.3))
    return cfg, data, model, engine, params, bs, mask, can


def _state(setup, modes):
    _, _, _, engine, params, bs, mask, _ = setup
    k = len(modes)
    return engine.init(stack([params] * k), stack([bs] * k), stack([mask] * k), seed_keys([0] * k))


def _counts(mask):
    return [int(np.sum(x)) for x in jax.tree.leaves(mask)]


def test_exact_counts_and_zeros_at_every_step_masks_move_at_update_steps_only(setup):
    engine, mask = setup[3], setup[6]
    modes = [STATIC, SET, RIGL]
    state = _state(setup, modes)
    prev = to_numpy(state.mask)
    union = prev  # the masks of every step, OR-ed by hand
    changed = {m: [] for m in modes}
    for t in range(STEPS):
        state = engine.run(state, [0] * 3, start=t, stop=t + 1, evaluate=False, member_args=modes).state
        host = to_numpy((state.mask, state.params, state.opt_state))
        union = jax.tree.map(np.logical_or, union, host[0])
        for k, m in enumerate(modes):
            mk = unstack(host[0], k)
            assert _counts(mk) == _counts(mask), (t, m)  # every layer keeps its exact count
            for w, mm in zip(jax.tree.leaves(unstack(host[1], k)), jax.tree.leaves(mk)):
                assert np.all(w[~mm] == 0)  # inactive weights exactly 0
            for mu in (host[2][0].mu, host[2][0].nu):  # and their Adam moments
                for v, mm in zip(jax.tree.leaves(unstack(mu, k)), jax.tree.leaves(mk)):
                    assert np.all(v[~mm] == 0)
            if any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mk), jax.tree.leaves(unstack(prev, k)))):
                changed[m].append(t)
        prev = host[0]
    want = update_steps(0, STEPS, delta_t=DT, end_step=END)
    assert want == [3, 6, 9, 12]
    assert changed[STATIC] == [] and changed[SET] == want and changed[RIGL] == want
    ever = to_numpy(state.ever)  # the state's running union: the by-hand one exactly
    for a, b in zip(jax.tree.leaves(ever), jax.tree.leaves(union)):
        assert np.array_equal(a, b)
    for k, m in enumerate(modes):
        got = _counts(unstack(ever, k))
        if m == STATIC:
            assert got == _counts(mask)  # a mask that never moves: ever active == final
        else:  # moved: more weights were active at some step than at the end, in every pruned layer
            assert all(g >= c for g, c in zip(got, _counts(mask))) and sum(got) > sum(_counts(mask))


def test_rigl_grows_the_largest_dense_gradient_as_update_mask_by_hand(setup):
    cfg, data, model, engine, _, _, _, can = setup
    u = 6
    before = engine.run(_state(setup, [RIGL]), [0], start=0, stop=u, evaluate=False, member_args=[RIGL])
    assert list(before.mask_info[u - 1]["regrown"][0]) == [-1] * 3  # no update between updates
    state = before.state
    params, mask = to_numpy(unstack(state.params, 0)), to_numpy(unstack(state.mask, 0))
    i = engine.order.indices(0, u, u + 1)[0]
    x, y = data.x_train[i], data.y_train[i]

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x, train=True), y).mean()

    grads = jax.grad(loss)(jax.tree.map(jnp.asarray, params))  # w.r.t. every weight, inactive ones included
    frac = drop_fraction(u, alpha=0.3, end_step=END)
    want = jax.tree.map(lambda w, m, g, c: np.asarray(update_mask(w, m.astype(np.float32), frac,
                                                                 grow_score=jnp.abs(g))[0]) > 0 if c else m,
                        params, mask, grads, can)
    res = engine.run(state, [0], start=u, stop=u + 1, evaluate=False, member_args=[RIGL])
    got = to_numpy(unstack(res.state.mask, 0))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(mask)))
    n = [int(np.sum(m)) for m, c in zip(jax.tree.leaves(mask), jax.tree.leaves(can)) if c]
    assert list(res.mask_info[u]["regrown"][0]) == [round(float(frac) * k) for k in n]


def test_resumed_equals_uninterrupted_and_population_equals_alone(setup):
    engine = setup[3]
    modes = [STATIC, SET, RIGL]
    whole = engine.run(_state(setup, modes), [0] * 3, evaluate=False, member_args=modes).state
    half = engine.run(_state(setup, modes), [0] * 3, start=0, stop=7, evaluate=False, member_args=modes).state
    resumed = engine.run(half, [0] * 3, start=7, evaluate=False, member_args=modes).state
    a, b = to_numpy((whole.mask, whole.params)), to_numpy((resumed.mask, resumed.params))
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
        assert np.array_equal(x, y)  # the update schedule is a function of the step
    ever_whole, ever_resumed = to_numpy(whole.ever), to_numpy(resumed.ever)
    for x, y in zip(jax.tree.leaves(ever_whole), jax.tree.leaves(ever_resumed)):
        assert np.array_equal(x, y)  # the ever-active union travels in the state across the resume
    assert sum(map(np.sum, jax.tree.leaves(ever_whole))) > sum(map(np.sum, jax.tree.leaves(a[0])))
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    for k, m in enumerate(modes):  # each member alone trains as in the population
        st = engine.run(_state(setup, [m]), [0], evaluate=False, member_args=[m]).state
        alone = to_numpy((st.mask, st.params))
        for x, y in zip(jax.tree.leaves(unstack(a[0], k)), jax.tree.leaves(unstack(alone[0], 0))):
            assert np.array_equal(x, y), m
        for x, y in zip(jax.tree.leaves(unstack(a[1], k)), jax.tree.leaves(unstack(alone[1], 0))):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_layer_counts_sum_exactly_and_follow_the_distribution():
    shapes = {"a": (784, 300), "b": (300, 100), "c": (100, 10)}
    for dist in ("erk", "uniform"):
        c = layer_counts(shapes, 26_000, dist)
        assert sum(c.values()) == 26_000
    assert layer_counts(shapes, 26_000, "erk")["c"] == 1000  # clamped dense
    u = layer_counts(shapes, 26_600, "uniform")
    assert [u[n] / np.prod(shapes[n]) for n in shapes] == pytest.approx([0.1] * 3, abs=1e-3)
    assert layer_counts(shapes, 5, "ticket", {"a": 1, "b": 2, "c": 2}) == {"a": 1, "b": 2, "c": 2}
    with pytest.raises(ValueError, match="distribution"):
        layer_counts(shapes, 5, "nope")


@pytest.fixture(scope="module")
def dst_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dst")
    cfg = tiny(seeds=[0], arms=["ticket", "static", "set", "rigl"], prune={"levels": 1, "dst_delta_t": 5},
               train={"steps": 30, "eval_every": 15})
    Lottery(cfg, out, progress=False).run()
    return cfg, out / cfg.run_id / "level_001"


def test_lottery_level_erk_budgets_stored_masks_and_regrowth_table(dst_run):
    cfg, d = dst_run
    members = pd.read_json(d / "members.json")
    masks, final = load_tree(d / "masks.msgpack"), load_tree(d / "final.msgpack")
    at = {a: int(members.index[members.arm == a][0]) for a in cfg.arms}
    ticket, static = unstack(masks, at["ticket"]), unstack(masks, at["static"])
    names = ["dense_0", "dense_1", "output"]
    shapes = {n: ticket[n]["kernel"].shape for n in names}
    total = sum(int(ticket[n]["kernel"].sum()) for n in names)
    erk = layer_counts(shapes, total, "erk")
    assert {n: int(static[n]["kernel"].sum()) for n in names} == erk  # the ERK budgets, the ticket's total
    assert erk != {n: int(ticket[n]["kernel"].sum()) for n in names}
    for arm in ("set", "rigl"):
        m, w = unstack(masks, at[arm]), unstack(final["params"], at[arm])
        assert _counts(m) == _counts(static)  # same start, same per-layer counts, moved
        assert not np.array_equal(m["dense_0"]["kernel"], static["dense_0"]["kernel"])
        for n in names:  # the stored mask is the one the final weights were trained with
            assert np.all(w[n]["kernel"][~m[n]["kernel"]] == 0)
    tab = pd.read_parquet(d / "dst.parquet")
    end = round(cfg.prune.dst_end * 30)
    assert sorted(set(tab.step)) == update_steps(0, 30, delta_t=5, end_step=end) == [5, 10, 15, 20]
    assert set(tab.arm) == {"set", "rigl"} and set(tab.layer) == {f"{n}/kernel" for n in names}
    r = tab[(tab.arm == "rigl") & (tab.step == 10) & (tab.layer == "dense_0/kernel")].regrown.item()
    assert r == round(float(drop_fraction(10, alpha=0.3, end_step=end)) * erk["dense_0"])
    ever = pd.read_parquet(d / "ever_active.parquet")  # per static/set/rigl member and prunable layer
    assert set(ever.arm) == {"static", "set", "rigl"} and set(ever.layer) == {f"{n}/kernel" for n in names}
    for row in ever.itertuples():
        m = unstack(masks, at[row.arm])[row.layer.split("/")[0]]["kernel"]
        assert row.active == int(m.sum()) and row.size == m.size  # the stored final mask
        assert row.ever >= row.active
        if row.arm == "static":
            assert row.ever == row.active
    moved = ever[ever.arm != "static"]
    assert (moved.ever > moved.active).any()


def test_dst_runs_train_alone_and_bad_settings_name_the_field():
    assert population_key(tiny(arms=["ticket", "rigl"])) is None
    assert population_key(tiny(arms=["ticket", "random_prune"])) is not None
    with pytest.raises(ConfigError, match="prune.distribution"):
        tiny(prune={"distribution": "er"})
    with pytest.raises(ConfigError, match="prune.dst_delta_t"):
        tiny(prune={"dst_delta_t": 0})


def test_step_by_step_segments_update_masks_as_the_scan(setup):
    cfg, data, model, engine, params, bs, mask, can = setup
    fn = make_mask_update(can, delta_t=DT, end_step=END, alpha=0.3)
    stepper = Engine(model, data, dataclasses.replace(cfg.train, segment="step"), mask_fn=fn)
    assert stepper.segment == "step"
    modes = [SET, RIGL]
    out = []
    for e in (engine, stepper):
        st = e.init(stack([params] * 2), stack([bs] * 2), stack([mask] * 2), seed_keys([0, 0]))
        res = e.run(st, [0, 0], stop=8, evaluate=False, member_args=modes)
        out.append((to_numpy(res.state.mask), res.mask_info[6]["regrown"]))
    for a, b in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        assert np.array_equal(a, b)
    assert np.array_equal(out[0][1], out[1][1]) and out[0][1].min() > 0


def test_mask_analysis_compares_each_arms_final_mask_with_the_ticket(dst_run):
    from analysis.masks import mask_analysis

    cfg, d = dst_run
    arms = mask_analysis(d.parent)["arms"]
    assert set(arms.arm) == {"static", "set", "rigl"}
    members = pd.read_json(d / "members.json")
    masks = load_tree(d / "masks.msgpack")
    k_t, k_r = (int(members.index[members.arm == a][0]) for a in ("ticket", "rigl"))
    a, b = masks["dense_1"]["kernel"][k_r], masks["dense_1"]["kernel"][k_t]
    row = arms[(arms.arm == "rigl") & (arms.layer == "dense_1/kernel")].iloc[0]
    assert row.jaccard_ticket == pytest.approx((a & b).sum() / (a | b).sum())
    assert row.density == pytest.approx(a.mean())
    ever = pd.read_parquet(d / "ever_active.parquet")
    e = ever[(ever.arm == "rigl") & (ever.layer == "dense_1/kernel")].ever.item()
    assert row.ever_active == pytest.approx(e / a.size) and row.ever_active > row.density
    st = arms[arms.arm == "static"]
    assert np.allclose(st.ever_active, st.density)  # never moved


def test_dst_table_shows_final_density_and_ever_active_per_layer(dst_run):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "dst_table", Path(__file__).resolve().parents[2] / "benchmarks" / "dst_table.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg, d = dst_run
    tab = bench.layer_table(d.parent)
    assert set(tab.arm) == {"static", "set", "rigl"} and (tab.level == 1).all()
    ever = pd.read_parquet(d / "ever_active.parquet")
    for row in tab.itertuples():
        e = ever[(ever.arm == row.arm) & (ever.layer == row.layer)].iloc[0]
        assert row.density == pytest.approx(e["active"] / e["size"], abs=1e-4)
        assert row.ever_active == pytest.approx(e["ever"] / e["size"], abs=1e-4) and row.ever_active >= row.density
    st = tab[tab.arm == "static"]
    assert (st.ever_active == st.density).all()
    assert (tab[tab.arm == "rigl"].ever_active > tab[tab.arm == "rigl"].density).any()
    acc = bench.main(d.parent)  # the accuracy / FLOPs table still reads the run
    assert set(acc.arm) == {"ticket", "static", "set", "rigl"}


@pytest.mark.parametrize("prune, fragment", [
    ({"granularity": "neuron"}, "prune.granularity = 'neuron'"),
    ({"granularity": "n:m", "n": 2, "m": 4}, "prune.granularity = 'n:m'"),
    ({"granularity": "head"}, "prune.granularity = 'head'"),
    ({"schedule": "gradual"}, "prune.schedule = 'gradual'"),
])
def test_dst_arms_with_structured_granularity_or_agp_are_a_config_error(prune, fragment):
    with pytest.raises(ConfigError, match="arms \\['set', 'rigl'\\] are not allowed with") as e:
        tiny(arms=["ticket", "set", "rigl"], prune=prune)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert "use prune." in str(e.value)  # what is allowed instead
    # the other arms keep those settings (AGP trains the ticket alone: any control is an error)
    if prune.get("schedule") == "gradual":
        tiny(arms=["ticket"], prune={**prune, "levels": 1})
        for control in ("random_prune", "reinit", "small_dense", "wanda"):
            with pytest.raises(ConfigError, match=f"arms = \\['ticket', '{control}'\\] is not allowed with "
                                                  "prune.schedule = 'gradual'.*set arms = \\['ticket'\\]"):
                tiny(arms=["ticket", control], prune={**prune, "levels": 1})
    else:
        tiny(arms=["ticket", "random_prune"], prune=prune)


def test_dst_arms_with_structured_granularity_stop_the_cli_before_any_work(tmp_path, capsys):
    from pathlib import Path

    from lth.cli import main

    out = tmp_path / "out"
    experiment = Path(__file__).resolve().parents[2] / "experiments" / "dst_lenet_fmnist.toml"
    code = main(["lottery", str(experiment), "--out", str(out), "--no-progress",
                 "--set", "prune.granularity=filter"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("lth: error: ") and "prune.granularity = 'filter'" in lines[0]
    assert not out.exists() or not any(out.rglob("*.json"))


def test_quant_arms_take_the_dst_arms_and_qat_from_the_rewind_point_refuses_moved_masks():
    cfg = tiny(seeds=[0], arms=["ticket", "static", "rigl"], quant={"arms": ["static", "rigl"]})
    assert cfg.quant.arms == ("static", "rigl")
    # QAT restarted at the rewind point with the final mask: how static trained, not how set / rigl did
    tiny(arms=["ticket", "static"], quant={"method": ["qat"], "qat_start": "rewind"})
    for arm in ("set", "rigl"):
        with pytest.raises(ConfigError, match=rf"quant.qat_start = 'rewind' is not allowed for the arms \['{arm}'\]: "
                                              r"their masks moved.*use quant.qat_start = 'trained'") as e:
            tiny(arms=["ticket", arm], quant={"method": ["qat"], "qat_start": "rewind"})
        assert "\n" not in str(e.value)
        tiny(arms=["ticket", arm], quant={"method": ["qat"], "qat_start": "trained"})
        tiny(arms=["ticket", arm], quant={"method": ["qat"], "qat_start": "rewind", "arms": ["ticket"]})

"""Small-dense baselines trained padded to full width (lth.prune.baselines.pads_exactly): the same numbers
as the narrow network to float rounding, and no programs of their own."""

import dataclasses
import json

import jax
import numpy as np

from lth.compiles import counting
from lth.data import load_dataset
from lth.lottery import run_lottery
from lth.models import build_model
from lth.prune.baselines import pad_params, pads_exactly, unpad_params
from lth.train import Engine, init_population, init_variables
from lth.trees import seed_keys

from helpers import tiny


def test_padded_small_dense_level_equals_the_narrow_one():
    cfg = tiny(train={"steps": 30, "eval_every": 10})
    data = load_dataset(cfg.data)
    full = build_model(cfg.model, data.num_classes, data.input_shape)
    narrow = build_model(dataclasses.replace(cfg.model, width=0.37), data.num_classes, data.input_shape)
    assert pads_exactly(narrow, full, data.input_shape)
    keys, seeds = seed_keys([0, 1]), [0, 1]
    params, _ = init_population(narrow, keys, data.input_shape)
    ones = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    full_shapes = jax.eval_shape(lambda k: init_variables(full, k, data.input_shape)[0], jax.random.key(0))
    narrow_shapes = jax.eval_shape(lambda k: init_variables(narrow, k, data.input_shape)[0], jax.random.key(0))
    padded, live = pad_params(params, full_shapes)

    e_narrow, e_full = Engine(narrow, data, cfg.train), Engine(full, data, cfg.train)
    a = e_narrow.run(e_narrow.init(params, {}, ones, keys), seeds)
    b = e_full.run(e_full.init(padded, {}, live, keys), seeds)
    pa, pb = jax.device_get(a.state.params), jax.device_get(b.state.params)
    for x, y, m in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), jax.tree.leaves(live)):
        assert not np.any(y[~m]), "a padded unit's weight moved"  # exactly 0 outside the narrow block
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(unpad_params(pb, narrow_shapes))):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)  # float rounding only (measured ~6e-8)
    assert [(r["member"], r["step"], r["split"]) for r in a.records] == \
        [(r["member"], r["step"], r["split"]) for r in b.records]
    for r, s in zip(a.records, b.records):
        np.testing.assert_allclose(s["loss"], r["loss"], rtol=1e-5)
        assert abs(s["accuracy"] - r["accuracy"]) <= 1 / 200  # at most one example of the 200 in test


def test_only_dense_chains_pad():
    cfg = tiny()
    data = load_dataset(cfg.data)
    full = build_model(cfg.model, data.num_classes, data.input_shape)
    assert pads_exactly(build_model(dataclasses.replace(cfg.model, width=0.5), data.num_classes, data.input_shape),
                        full, data.input_shape)
    wider = build_model(dataclasses.replace(cfg.model, width=1.5), data.num_classes, data.input_shape)
    assert not pads_exactly(wider, full, data.input_shape)
    conv = dataclasses.replace(cfg.model, name="conv2")
    img = (28, 28, 1)
    assert not pads_exactly(build_model(dataclasses.replace(conv, width=0.5), 10, img), build_model(conv, 10, img), img)


def test_small_dense_levels_build_no_training_programs_of_their_own(tmp_path):
    """With the engines' shared programs dropped before each run (so each builds its programs anew:
    compiled, or read from the compile cache), the small-dense members of levels 1 and 2 (two new
    widths) add no train or eval program to a ticket-only run's."""
    from lth import train
    built = {}
    for arms in (["ticket"], ["ticket", "small_dense"]):
        cfg = tiny(arms=arms, prune={"levels": 2}, train={"steps": 20, "eval_every": 10})
        train._PROGRAMS.clear()
        with counting() as c:
            run_lottery(cfg, tmp_path / str(len(arms)))
        built[len(arms)] = c.built("jit(sharded)")
    assert built[2] == built[1] > 0, built
    marker = next(tmp_path.glob("2/*/level_002/small_dense_padded.json"))
    assert json.loads(marker.read_text()) == {"full_width": 1.0}

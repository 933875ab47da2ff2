"""Small-dense baselines trained padded to full width (lth.prune.baselines.pads_exactly): the same numbers
as the narrow network to float rounding, and no programs of their own."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np

from lth.data import load_dataset
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


_COUNT = """
import json, sys
sys.path.insert(0, "tests")
from helpers import tiny
from lth.compiles import counting
from lth.lottery import run_lottery
out = {}
for arms in (["ticket"], ["ticket", "small_dense"]):
    cfg = tiny(arms=arms, prune={"levels": 2}, train={"steps": 20, "eval_every": 10})
    with counting() as c:
        run_lottery(cfg, f"{sys.argv[1]}/{len(arms)}")
    out["+".join(arms)] = dict(c.by_name)
print(json.dumps(out))
"""


def test_small_dense_levels_compile_no_training_programs_of_their_own(tmp_path):
    """Without a compile cache every program is compiled once per Lottery: the small-dense members of
    levels 1 and 2 (two new widths) add no train or eval program to the ticket-only run's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["LTH_COMPILE_CACHE"] = "off"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", _COUNT, str(tmp_path)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    ticket, both = counts["ticket"], counts["ticket+small_dense"]
    assert both.get("jit(sharded)", 0) == ticket.get("jit(sharded)", 0) > 0, counts
    run = next(tmp_path.glob("2/*/level_002/small_dense_padded.json"))
    assert json.loads(run.read_text()) == {"full_width": 1.0}

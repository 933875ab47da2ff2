"""lth.prune.baselines.narrow_init: a small-dense model's init from the full-width model's program,
bit-identical to the narrow model's own init program, with no program per width."""

import dataclasses

import jax
import numpy as np
import pytest

from lth.compiles import counting
from lth.config import ModelConfig
from lth.models import build_model
from lth.prune.baselines import narrow_init
from lth.train import init_population
from lth.trees import seed_keys


@pytest.mark.parametrize("name,widths,init,shape", [
    ("mlp", [100, 100], "glorot_normal", (40,)),
    ("lenet_300_100", [300, 100], "kaiming_normal", (28, 28, 1)),
])
def test_narrow_init_equals_the_narrow_models_own_init(name, widths, init, shape):
    cfg = ModelConfig(name=name, widths=widths, init=init)
    full = build_model(cfg, 10, shape)
    keys = seed_keys([0, 3])
    for width in (0.11, 0.37, 0.8):  # widths of a quickstart's small-dense levels
        narrow = build_model(dataclasses.replace(cfg, width=width), 10, shape)
        want, _ = jax.device_get(init_population(narrow, keys, shape))
        got = narrow_init(narrow, full, keys, shape)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert np.array_equal(a, b)  # bit-identical, not close


def test_a_new_width_builds_no_program():
    cfg = ModelConfig(name="mlp", widths=[64, 32])
    full = build_model(cfg, 10, (40,))
    keys = seed_keys([0, 1])
    narrow_init(build_model(dataclasses.replace(cfg, width=0.5), 10, (40,)), full, keys, (40,))
    with counting() as c:
        for width in (0.23, 0.41):
            assert narrow_init(build_model(dataclasses.replace(cfg, width=width), 10, (40,)), full, keys, (40,))
    assert c.compiles + c.hits == 0, c.by_name


def test_models_it_does_not_draw_fall_back():
    conv = ModelConfig(name="conv2")
    img = (28, 28, 1)
    assert narrow_init(build_model(dataclasses.replace(conv, width=0.5), 10, img), build_model(conv, 10, img),
                       seed_keys([0]), img) is None

"""Activation ranges (lth.quant.wiring.input_ranges): a short last calibration batch runs the full batches'
program (padded with copies of its last row) and gives the same min and max."""

import jax
import jax.numpy as jnp
import numpy as np

from lth.compiles import counting
from lth.models import MLP
from lth.quant.wiring import input_ranges

from helpers import random_params


def test_a_short_last_batch_builds_no_program_and_keeps_the_ranges():
    model = MLP((24, 16), 4)
    params = jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * 2), random_params(model, (12,), density=0.5))
    xs = np.random.default_rng(0).normal(size=(300, 12)).astype(np.float32)
    xs[-1] = 0.0  # the repeated row holds no extreme
    xs[260, 3] = -50.0  # an extreme inside the short last batch
    input_ranges(model, params, {}, xs[:256], batch_size=128)
    with counting() as c:
        lo, hi = input_ranges(model, params, {}, xs, batch_size=128)  # 128 + 128 + 44 rows
    assert c.compiles + c.hits == 0, (c.by_name, c.hits_by_name)
    ref_lo, ref_hi = input_ranges(model, params, {}, xs, batch_size=300)  # one batch: the exact range
    assert lo.keys() == ref_lo.keys() and lo
    for k in lo:
        assert np.array_equal(lo[k], ref_lo[k]) and np.array_equal(hi[k], ref_hi[k]), k
    assert float(lo["dense_0"][0]) == -50.0

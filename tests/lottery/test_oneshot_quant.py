"""The one-shot arms' members through the quant stage's quantizers: their pruned weights stay exactly +0.0
under PTQ, QAT and GPTQ (DESIGN: pruned weights stay exactly zero through PTQ and QAT)."""

import jax
import numpy as np

from helpers import random_params, tiny
from lth.data import load_dataset
from lth.models import build_model
from lth.prune.oneshot_net import prune_population
from lth.quant import QuantSpec, ptq_population
from lth.quant.gptq_net import gptq_population
from lth.quant.qat import qat

METHODS = ["magnitude", "wanda", "sparsegpt"]  # the members of oneshot_magnitude(_ft), wanda(_ft), sparsegpt(_ft)
KERNELS = ("dense_0", "dense_1", "output")


def _zero_where_pruned(qts, masks, what):
    for k, method in enumerate(METHODS):
        for layer in KERNELS:
            m = np.asarray(masks[layer]["kernel"][k])
            w = np.asarray(qts[k].params[layer]["kernel"])
            assert (~m).sum() >= 0.4 * m.size, (what, method, layer)  # the method pruned this layer
            assert np.all(w[~m] == 0.0) and not np.signbit(w[~m]).any(), (what, method, layer)
            assert np.count_nonzero(w[m]) > 0.5 * m.sum(), (what, method, layer)  # not a collapsed kernel


def test_pruned_weights_of_oneshot_members_stay_exactly_zero_through_ptq_qat_and_gptq():
    cfg = tiny(seeds=[0])
    data = load_dataset(cfg.data)
    model = build_model(cfg.model, data.num_classes, data.input_shape)
    dense = jax.tree.map(np.asarray, random_params(model, data.input_shape))
    calib = data.x_train[:100]
    targets = {(layer, "kernel"): 0.5 for layer in KERNELS}
    params, masks = prune_population(model, METHODS, [dense] * 3, [{}] * 3, [calib] * 3, [targets] * 3)
    stack = lambda ts: jax.tree.map(lambda *a: np.stack(a), *ts)  # noqa: E731
    params, masks = stack(params), stack(masks)
    spec = QuantSpec(3, "asym", "tensor", act_bits=8)
    _zero_where_pruned(ptq_population(model, params, {}, spec, calib, cle=True), masks, "ptq")
    qts, _ = qat(model, data, cfg.train, params, {}, masks, spec, calib, seeds=[0, 1, 2], steps=2, lr=1e-2,
                 learned_scale=True)
    _zero_where_pruned(qts, masks, "qat")
    # GPTQ: the kept weights absorb the rounding errors, the pruned ones stay +0.0 (the sweep left -0.0)
    qts = gptq_population(model, params, {}, masks, QuantSpec(3, act_bits=8), calib, group_size=8, act_order=True)
    _zero_where_pruned(qts, masks, "gptq")

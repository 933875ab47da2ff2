"""GPTQ and joint SparseGPT + GPTQ against the paper's algorithm written in numpy (float64, the
explicit inverse Hessian of the remaining columns, no Cholesky trick, no lazy blocks)."""

import numpy as np
import pytest

from lth.quant.gptq import gptq, round_to_nearest
from obs_reference import layer, np_hessian, np_unstructured_chooser, np_obs_sweep_live


def np_grid(wc, bits):
    """lth's symmetric narrow-range min-max grid of each row of ``wc``."""
    qmax = 2 ** (bits - 1) - 1
    lo, hi = np.minimum(wc.min(axis=1), 0), np.maximum(wc.max(axis=1), 0)
    s = np.maximum(-lo, hi) / qmax
    return np.where(s > 0, s, 1.0)


def np_gptq(w, x, bits, group=None, act_order=False, block=128, density=None):
    h = np_hessian(x)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(w.shape[1])
    h, w = h[perm][:, perm], w[:, perm].astype(np.float64)
    qmax = 2 ** (bits - 1) - 1
    state = {"s": np_grid(w, bits)}
    cur = {"w": w}

    def project(col, j):
        if group is not None and j % group == 0:
            state["s"] = np_grid(cur["w"][:, j:j + group] * cur["mask"][:, j:j + group], bits)
        return np.clip(np.round(col / state["s"]), -qmax, qmax) * state["s"]

    def choose(wb, d2, start):
        m = np.ones_like(wb) if density is None else np_unstructured_chooser(*w.shape, block, density)(wb, d2, start)
        cur.setdefault("mask", np.ones_like(w))[:, start:start + wb.shape[1]] = m
        return m
    # the sweep updates w in place column by column; the groups' grids need those current values
    w_live = w.copy()
    cur["w"] = w_live
    out, mask = np_obs_sweep_live(w_live, h, choose, project, block)
    inv = np.argsort(perm)
    return out[:, inv], mask[:, inv]


@pytest.mark.parametrize("group,act_order,block", [(None, False, 1), (None, False, 128), (32, True, 128)])
def test_gptq_equals_the_papers_algorithm(group, act_order, block):
    w, x = layer()
    got, mask, params = gptq(w, x, bits=4, group_size=group, act_order=act_order, block=block)
    ref, _ = np_gptq(w, x, 4, group=group, act_order=act_order, block=block)
    got = np.asarray(got)
    close = np.isclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    assert close.mean() > 0.995, close.mean()  # a float32 sweep may flip a rare half-way rounding
    assert np.asarray(mask).all()
    assert np.asarray(params["scale"]).shape == ((1 if group is None else 160 // group), 12)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    from lth.prune.oneshot import reconstruction_error
    for seed in range(3):
        w, x = layer(seed=seed)
        for bits in (4, 3, 2):
            q, _, _ = gptq(w, x, bits=bits)
            rtn = round_to_nearest(w, bits=bits)
            assert reconstruction_error(w, q, x) <= reconstruction_error(w, rtn, x), (seed, bits)


def test_joint_sparsegpt_gptq_is_sparse_and_on_the_grid():
    w, x = layer()
    q, mask, params = gptq(w, x, bits=4, density=0.5)
    q, mask = np.asarray(q), np.asarray(mask)
    assert int(mask.sum()) == round(0.5 * w.size) and np.all(q[mask == 0] == 0.0)
    s = np.asarray(params["scale"])[0][:, None]
    codes = q / s
    assert np.allclose(codes, np.round(codes), atol=1e-3) and np.abs(np.round(codes)).max() <= 7
    ref, ref_mask = np_gptq(w, x, 4, density=0.5)
    assert np.array_equal(mask, ref_mask)
    assert np.isclose(q, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max()).mean() > 0.995


def test_gptq_with_a_fixed_mask_keeps_it_and_beats_rounding_the_masked_weights():
    from lth.prune.oneshot import reconstruction_error
    w, x = layer()
    fixed = (np.random.default_rng(2).random(w.shape) < 0.5).astype(np.float32)
    for group, act_order in ((None, False), (32, True)):
        q, mask, params = gptq(w, x, bits=3, mask=fixed, group_size=group, act_order=act_order)
        q = np.asarray(q)
        assert np.array_equal(np.asarray(mask), fixed) and np.all(q[fixed == 0] == 0.0)
        rtn = round_to_nearest(w * fixed, bits=3, group_size=group)
        assert reconstruction_error(w * fixed, q, x) <= reconstruction_error(w * fixed, rtn, x)
        idx = np.asarray(params["group_index"])
        assert idx.shape == (160,) and idx.max() == (0 if group is None else 160 // group - 1)
    with pytest.raises(ValueError, match="fixed mask or nm"):
        gptq(w, x, bits=3, mask=fixed, nm=(2, 4))


def test_joint_pass_on_a_ticket_prunes_only_among_its_survivors():
    w, x = layer()
    fixed = (np.random.default_rng(2).random(w.shape) < 0.7).astype(np.float32)
    q, mask, _ = gptq(w, x, bits=4, mask=fixed, density=0.5)
    q, mask = np.asarray(q), np.asarray(mask)
    assert int(mask.sum()) == round(0.5 * w.size) and np.all(mask <= fixed) and np.all(q[mask == 0] == 0.0)
    # on a dense layer (all-ones mask) it is the paper's joint pass exactly
    a = gptq(w, x, bits=4, mask=np.ones_like(w), density=0.5)
    b = gptq(w, x, bits=4, density=0.5)
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[1])) and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))

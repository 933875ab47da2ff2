"""Wanda and SparseGPT against references written from the papers' equations in numpy (float64).

The SparseGPT reference does not use the Cholesky trick: it keeps the inverse Hessian of the columns
not yet processed explicitly and removes a column from it by Gaussian elimination (SparseGPT Eq. 3,
GPTQ Eq. 3), so it checks lth's factor-based sweep and its lazy batched updates independently.
"""

import numpy as np
import pytest

from lth.prune.obs import inverse_cholesky, layer_hessian, reconstruct
from lth.prune.oneshot import block_prune_counts, reconstruction_error, sparsegpt, wanda, wanda_scores
from obs_reference import layer, np_hessian, np_obs_sweep, np_unstructured_chooser


@pytest.mark.parametrize("block", [1, 128])
def test_sparsegpt_equals_the_papers_algorithm(block):
    w, x = layer()
    got_w, got_m = sparsegpt(w, x, density=0.5, block=block)
    ref_w, ref_m = np_obs_sweep(w, np_hessian(x), np_unstructured_chooser(*w.shape, block, 0.5), lambda c, j: c, block)
    assert np.array_equal(np.asarray(got_m), ref_m)
    np.testing.assert_allclose(np.asarray(got_w), ref_w, rtol=2e-3, atol=2e-3 * np.abs(ref_w).max())
    assert int(np.asarray(got_m).sum()) == round(0.5 * w.size)  # exact count
    assert np.all(np.asarray(got_w)[np.asarray(got_m) == 0] == 0.0)


def test_sparsegpt_nm_equals_the_papers_algorithm_and_counts_are_exact():
    w, x = layer(cols=64)

    def choose(wb, d2, start):
        s = (wb ** 2 / d2[None, :]).reshape(wb.shape[0], -1, 4)
        keep = np.zeros_like(s)
        np.put_along_axis(keep, np.argsort(-s, axis=2, kind="stable")[:, :, :2], 1.0, axis=2)
        return keep.reshape(wb.shape)
    got_w, got_m = sparsegpt(w, x, nm=(2, 4), block=16)
    ref_w, ref_m = np_obs_sweep(w, np_hessian(x), choose, lambda c, j: c, 16)
    assert np.array_equal(np.asarray(got_m), ref_m)
    np.testing.assert_allclose(np.asarray(got_w), ref_w, rtol=2e-3, atol=2e-3 * np.abs(ref_w).max())
    assert np.all(np.asarray(got_m).reshape(w.shape[0], -1, 4).sum(-1) == 2)


def test_lazy_batched_updates_do_not_change_the_result():
    w, x = layer(cols=96)
    fixed = (np.random.default_rng(3).random(w.shape) < 0.4).astype(np.float32)
    u = inverse_cholesky(layer_hessian(x))
    outs = [np.asarray(reconstruct(w, u, block=b, choose=lambda wb, d, s: fixed[:, s:s + wb.shape[1]])[0])
            for b in (1, 7, 32, 96)]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-4, atol=1e-4 * np.abs(outs[0]).max())


def test_sparsegpt_update_lowers_the_reconstruction_error_of_a_fixed_mask():
    w, x = layer()
    fixed = (np.random.default_rng(1).random(w.shape) < 0.5).astype(np.float32)
    u = inverse_cholesky(layer_hessian(x))
    w_new, m, _ = reconstruct(w, u, block=128, choose=lambda wb, d, s: fixed[:, s:s + wb.shape[1]])
    assert np.array_equal(np.asarray(m), fixed)
    assert reconstruction_error(w, w_new, x) < 0.7 * reconstruction_error(w, w * fixed, x)


def test_wanda_scores_and_per_row_selection():
    w, x = layer(rows=6, cols=40)
    s = np.asarray(wanda_scores(w, x))
    ref = np.abs(w) * np.sqrt((x.astype(np.float64) ** 2).sum(axis=0))[None, :]
    np.testing.assert_allclose(s, ref, rtol=1e-5)
    pruned, m = wanda(w, x, density=0.3)
    m = np.asarray(m)
    assert np.all(m.sum(axis=1) == 12)  # every output row keeps round(0.3 * 40)
    for r in range(w.shape[0]):  # ... its own highest scores
        assert ref[r][m[r] == 1].min() >= ref[r][m[r] == 0].max()
    assert np.all(np.asarray(pruned)[m == 0] == 0) and np.array_equal(np.asarray(pruned)[m == 1], w[m == 1])
    _, m24 = wanda(w, x, nm=(2, 4))
    assert np.all(np.asarray(m24).reshape(6, 10, 4).sum(-1) == 2)


def test_block_counts_sum_exactly():
    for rows, cols, block, d in [(12, 160, 128, 0.5), (7, 33, 5, 0.1), (300, 784, 128, 0.2)]:
        counts = block_prune_counts(rows, cols, block, d)
        assert sum(counts) == rows * cols - round(d * rows * cols)
        assert len(counts) == -(-cols // block)


def test_bad_shapes_and_patterns_are_one_line_errors():
    w, x = layer(cols=30)
    with pytest.raises(ValueError, match="m dividing"):
        sparsegpt(w, x, nm=(2, 4))
    with pytest.raises(ValueError, match=r"x \[N, in\]"):
        wanda(w, x[:, :10], density=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        wanda(w, x)

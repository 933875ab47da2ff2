"""Mask analysis from the store: Jaccard, one-shot top-k and sign flips by hand; invariants on a tiny run."""

import json
import shutil

import numpy as np
import pytest

from analysis.masks import jaccard, load_earlybird, mask_analysis, random_jaccard, sign_flip_fraction, topk_mask
from helpers import tiny
from lth.lottery.runner import Lottery


def test_jaccard_by_hand():
    a = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0], [1, 0, 0, 1]], bool)
    assert jaccard(a, b) == pytest.approx(2 / 5)  # both: (0,0), (1,0); either: 5 entries
    assert jaccard(a, a) == 1.0
    assert jaccard(a, ~a) == 0.0
    assert jaccard(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert random_jaccard(0.5) == pytest.approx(1 / 3)


def test_topk_mask_and_sign_flips_by_hand():
    w = np.array([[0.5, -3.0], [2.0, -0.5]])
    assert topk_mask(w, 2).tolist() == [[False, True], [True, False]]
    assert topk_mask(w, 3).tolist() == [[True, True], [True, False]]  # tie |0.5| = |-0.5|: lower index
    init = np.array([1.0, -2.0, 3.0, -4.0, 5.0])
    final = np.array([-1.0, -2.0, -3.0, 4.0, 0.0])
    mask = np.array([True, True, True, False, True])
    # survivors 0, 1, 2, 4: signs flip at 0 and 2, and at 4 (trained to exactly 0: sign 0 != +1)
    assert sign_flip_fraction(init, final, mask) == pytest.approx(3 / 4)
    assert np.isnan(sign_flip_fraction(init, final, np.zeros(5, bool)))


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    out = tmp_path_factory.mktemp("masks")
    cfg = tiny(seeds=[0, 1, 2], arms=["ticket", "random_prune"], prune={"levels": 2},
               train={"steps": 30, "eval_every": 30})
    Lottery(cfg, out, progress=False).run()
    return mask_analysis(out), out


def test_store_invariants_of_the_mask_tables(tables):
    t, _ = tables
    ticket, seeds, levels = t["ticket"], t["seeds"], t["levels"]
    layers = {"dense_0/kernel", "dense_1/kernel", "output/kernel", "all"}
    assert set(ticket["layer"]) == layers and sorted(ticket["level"].unique()) == [0, 1, 2]
    one = ticket[ticket["level"] == 1]
    # layerwise magnitude IMP from the dense level: level 1's ticket IS one-shot |w| of the trained dense net
    assert np.allclose(one["jaccard_oneshot_trained"], 1.0)
    # level 0 keeps everything, so the overlap with it is the density
    assert np.allclose(one["jaccard_prev_level"], one["density"])
    assert (ticket.loc[ticket["level"] > 0, "jaccard_oneshot_init"] < 1).all()
    assert ticket["sign_flip"].between(0, 1).all()
    # every pair of 3 seeds at each level and layer, the level-0 (dense) masks identical
    assert len(seeds) == 3 * 3 * len(layers) and np.allclose(seeds.loc[seeds["level"] == 0, "jaccard"], 1)
    # consecutive-level rows of the level table are the ticket table's jaccard_prev_level
    cons = levels[levels["level_b"] == levels["level_a"] + 1].set_index(["seed", "level_b", "layer"])["jaccard"]
    prev = ticket[ticket["level"] > 0].set_index(["seed", "level", "layer"])["jaccard_prev_level"]
    assert np.allclose(cons.sort_index().to_numpy(), prev.sort_index().to_numpy())


def test_overall_jaccard_pools_the_layers(tables):
    t, _ = tables
    s = t["seeds"]
    row = s[(s["level"] == 2) & (s["seed_a"] == 0) & (s["seed_b"] == 1)].set_index("layer")["jaccard"]
    per_layer = row.drop("all")
    assert per_layer.min() <= row["all"] <= per_layer.max()


def test_stores_without_early_bird_tables_read_empty(tables, tmp_path):
    _, out = tables
    old = tmp_path / "old"
    shutil.copytree(out, old)
    assert not load_earlybird(old).empty
    for f in old.glob("*/level_000/earlybird.parquet"):  # a store written before the table existed
        f.unlink()
        marker = json.loads((f.parent / "COMPLETE").read_text())
        del marker["sha256"]["earlybird.parquet"]
        (f.parent / "COMPLETE").write_text(json.dumps(marker))
    assert load_earlybird(old).empty
    assert not mask_analysis(old)["ticket"].empty


def test_report_of_a_one_seed_run_draws_the_overlap_figure_without_seed_pairs(tmp_path):
    from analysis.report import write_report

    one = tmp_path / "one"
    cfg = tiny(seeds=[0], arms=["ticket"], prune={"levels": 1}, train={"steps": 20, "eval_every": 20})
    Lottery(cfg, one, progress=False).run()
    made = write_report(one, tmp_path / "figs")
    assert "mask_overlap_vs_density" in made and "mask_overlap_seeds" not in made
    assert "earlybird_distance" in made

"""A language model is judged by bits per byte everywhere: the quant stage's rows and log lines, the
report's figures and tables (lower is better, named on the axis) and the progress bar."""

import math

import numpy as np
import pandas as pd
import pytest
from helpers import tiny

from lth.data import load_dataset
from lth.lottery import run_lottery
from lth.stored import StoredRun


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny GPT: dense level 0 and one level of ticket + random_prune, on a small UTF-8 corpus."""
    root = tmp_path_factory.mktemp("lm")
    words = "the lottery ticket hypothesis says dense networks contain sparse subnetworks that train well".split()
    rng = np.random.default_rng(0)
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 1500)) + "\n", encoding="utf-8")
    cfg = tiny(seeds=[0], arms=["ticket", "random_prune"],
               data={"name": "text", "path": str(corpus), "context": 8, "val_size": None,
                     "mnist1d_samples": 10000},
               model={"name": "gpt", "depth": 1, "dim": 16, "heads": 2, "mlp_ratio": 2.0, "widths": [300, 100]},
               train={"optimizer": "adamw", "lr": 3e-3, "batch_size": 8, "steps": 10, "eval_every": 5,
                      "clip_norm": 1.0},
               prune={"levels": 1, "rate": 0.5, "output_rate": None})
    load_dataset.cache_clear()
    store = run_lottery(cfg, root / "runs")
    return root / "runs", store.path


def test_quant_rows_of_a_language_model_carry_bits_per_byte(lm_run):
    from lth.quant.stage import COLUMNS, quantize_run
    _, path = lm_run
    lines = []
    rows = quantize_run(path, levels=[1], bits_list=[8, 4], methods=["ptq", "qat"], qat_steps=3, log=lines.append)
    assert set(COLUMNS) <= set(rows.columns)
    assert set(rows["method"]) == {"ptq", "qat", "float_ft"}
    for split in ("", "val_"):
        loss = rows[f"{split}loss"].to_numpy()
        assert np.isfinite(loss).all() and (loss > 0).all()
        np.testing.assert_allclose(rows[f"{split}perplexity"], np.exp(loss), rtol=1e-9)
        np.testing.assert_allclose(rows[f"{split}bits_per_byte"], loss / math.log(2), rtol=1e-9)
    # the float reference is the trained member evaluated on training's own fixed windows
    metrics = StoredRun.open(path).metrics(1)
    for arm in ("ticket", "random_prune"):
        m = metrics[(metrics["arm"] == arm) & (metrics["split"] == "test")].sort_values("step")
        ref = rows.loc[rows["arm"] == arm, "float_bits_per_byte"]
        np.testing.assert_allclose(ref, float(m["bits_per_byte"].iloc[-1]), rtol=1e-5)
    # 4-bit PTQ hurts the model: more bits per byte than 8-bit and than float
    ptq = rows[(rows["method"] == "ptq") & (rows["arm"] == "ticket")].set_index("bits")
    assert ptq.loc[4, "bits_per_byte"] > ptq.loc[8, "bits_per_byte"] - 1e-6
    # every log line judges in bits per byte, never a percentage
    assert len(lines) == 2 * 5 and all("bits per byte" in x and "lower is better" in x and "%" not in x
                                       for x in lines)
    assert all("float_ft" in x and "not computed" not in x for x in lines if " qat " in x)


def test_classifier_quant_rows_have_a_loss_but_no_bits_per_byte(tmp_path):
    from lth.quant.stage import quantize_run
    store = run_lottery(tiny(seeds=[0], arms=["ticket"], prune={"levels": 1}, train={"steps": 10}), tmp_path)
    lines = []
    rows = quantize_run(store.path, levels=[1], bits_list=[8], methods=["ptq"], log=lines.append)
    assert np.isfinite(rows["loss"]).all() and np.isfinite(rows["val_loss"]).all()
    assert rows[["perplexity", "bits_per_byte", "float_bits_per_byte"]].isna().all().all()
    assert "test acc" in lines[0] and "%" in lines[0]

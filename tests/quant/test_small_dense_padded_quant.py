"""The quant stage of small-dense members run padded to full width (lth.quant.stage.pads_setting): the
narrow network's numbers up to float rounding, its sizes exactly, and no programs of its own at a new width."""

import numpy as np
import pandas as pd
import pytest

from lth.compiles import counting
from lth.lottery import run_lottery
from lth.quant.stage import QuantStage, float_ft_setting, quant_config, settings_of
from lth.stored import StoredRun

from helpers import tiny

SAME = ["run_id", "level", "arm", "seed", "density", "param_count", "bits", "method", "scheme", "granularity",
        "calibration", "act_bits", "act_scheme", "size_bytes", "compression", "float_size_bytes",
        "fp32_dense_bytes", "fp16_dense_bytes", "int8_dense_bytes", "qat_steps", "qat_lr"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    cfg = tiny(seeds=[0], arms=["ticket", "small_dense"], prune={"levels": 2}, train={"steps": 20, "eval_every": 10})
    store = run_lottery(cfg, tmp_path_factory.mktemp("sdq"))
    return store.path


def stage_of(run_dir, padded: bool, **settings) -> QuantStage:
    qc = quant_config(None, **{"bits": [8, 2], "method": ["ptq", "qat"], "qat_steps": 3, "levels": "all", **settings})
    stage = QuantStage(StoredRun.open(run_dir), qc, write=False, record=False)
    stage.pad_small_dense = padded
    return stage


def small_rows(run_dir, padded: bool, levels=(1,), **settings) -> pd.DataFrame:
    df = stage_of(run_dir, padded, **settings).run_levels(list(levels))
    return df[df.arm == "small_dense"].sort_values(["level", "method", "bits"]).reset_index(drop=True)


def test_padded_quant_cells_equal_the_narrow_ones(run_dir):
    stage = stage_of(run_dir, True)
    small = stage.run.small_dense(1)
    for setting in settings_of(stage.qc) + [float_ft_setting(stage.qc)]:  # every one of them runs padded
        assert stage._padded(small, setting).model is stage.run.model, setting.label
    narrow, padded = small_rows(run_dir, False), small_rows(run_dir, True)
    assert len(narrow) == 5 and sorted(set(narrow.method)) == ["float_ft", "ptq", "qat"]  # 2 bits x 2 + float_ft
    pd.testing.assert_frame_equal(padded[SAME], narrow[SAME])  # sizes and every setting column: equal
    for col in ("accuracy", "val_accuracy", "float_accuracy", "float_val_accuracy"):
        assert np.all(np.abs(padded[col] - narrow[col]) <= 1 / 200 + 1e-9), col  # at most one example
    for col in ("loss", "val_loss"):
        np.testing.assert_allclose(padded[col], narrow[col], rtol=1e-5)


def test_a_setting_that_must_stay_narrow_stays_narrow(run_dir):
    """Percentile activation ranges sample the padded units' zeros (and LSQ counts them): the narrow path,
    bit for bit."""
    kw = dict(calibration=["percentile"], method=["ptq"])
    stage = stage_of(run_dir, True, **kw)
    small = stage.run.small_dense(1)
    assert all(stage._padded(small, s) is small for s in settings_of(stage.qc))
    lsq = stage_of(run_dir, True, learned_scale=True)  # LSQ's gradient scale would count the padded units
    assert all(lsq._padded(small, s) is small for s in settings_of(lsq.qc) if s.method == "qat")
    a, b = small_rows(run_dir, False, **kw), small_rows(run_dir, True, **kw)
    assert len(a) == 2
    pd.testing.assert_frame_equal(b.drop(columns="wall_s"), a.drop(columns="wall_s"))


def test_a_new_small_dense_width_builds_no_quant_program(run_dir):
    """Level 2's small-dense members (another width than level 1's) reuse level 1's quant programs."""
    small_rows(run_dir, True, levels=(1,), arms=["small_dense"])
    with counting() as c:
        df = small_rows(run_dir, True, levels=(2,), arms=["small_dense"])
    assert len(df) == 5
    assert c.compiles + c.hits == 0, (c.by_name, c.hits_by_name)

"""The experiment's quant settings: recorded by its quant stage, reused by `lth quantize RUN` without --config."""

import json

import pytest

from lth.config import QuantConfig
from lth.quant.stage import QuantStage
from lth.stored import QUANT_SETTINGS, StoredRun

from test_quant import write_store


def test_quantize_without_config_reuses_the_settings_the_experiments_stage_used(tmp_path, capsys):
    from lth.cli import main

    run_dir = write_store(tmp_path)
    assert not (run_dir / QUANT_SETTINGS).exists()
    qc = QuantConfig.from_dict({"bits": [4], "arms": ["ticket"], "levels": [1]})
    QuantStage(StoredRun.open(run_dir), qc).run_level(1)  # the experiment's [quant] stage
    rec = json.loads((run_dir / QUANT_SETTINGS).read_text())
    assert rec["quant"]["bits"] == [4] and "tiny" in rec["source"]

    assert main(["quantize", str(run_dir), "--no-write", "--recompute"]) == 0
    out, err = capsys.readouterr()
    assert "quant settings: the [quant] table of experiment 'tinyq', recorded with the run" in err
    assert "1 rows" in out  # bits 4, the ticket, level 1 only (the defaults: bits 8,4,2 and every arm and level)

    # --set and the options apply on top of them
    assert main(["quantize", str(run_dir), "--no-write", "--set", "quant.bits=[8, 2]"]) == 0
    out, err = capsys.readouterr()
    assert "2 rows" in out and "recorded with the run" in err

    # --config still wins
    toml = tmp_path / "exp.toml"
    toml.write_text("[quant]\nbits = [2]\narms = ['reinit']\nlevels = [1]\n")
    assert main(["quantize", str(run_dir), "--no-write", "--config", str(toml)]) == 0
    out, err = capsys.readouterr()
    assert f"the [quant] table of {toml}" in err
    assert "1 rows" in out and "reinit" in out and "ticket" not in out
    # lth quantize's own settings are not recorded: the experiment's stay what a plain call starts from
    assert main(["quantize", str(run_dir), "--config", str(toml)]) == 0
    assert json.loads((run_dir / QUANT_SETTINGS).read_text()) == rec


def test_a_run_without_recorded_settings_says_it_uses_the_defaults_and_a_damaged_record_is_named(tmp_path, capsys):
    from lth.cli import main

    run_dir = write_store(tmp_path)
    assert main(["quantize", str(run_dir), "--no-write", "--levels", "0", "--bits", "8"]) == 0
    assert "quant settings: the defaults (the run records no quant settings)" in capsys.readouterr().err
    (run_dir / QUANT_SETTINGS).write_text("[1, 2]")
    assert main(["quantize", str(run_dir), "--no-write"]) == 2
    assert f"{run_dir / QUANT_SETTINGS}: holds no [quant] table" in capsys.readouterr().err

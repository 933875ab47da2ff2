"""Numerics versions: quant cells and runs computed before a fix of their numerics are not reused as current."""

import hashlib
import json

import pandas as pd
import pytest

from analysis.runs import load_quant
from lth.config import ConfigError, ExperimentConfig, check_numerics, legacy_filled, stored_run_id
from lth.quant import quantize_run
from lth.quant.stage import QUANT_DIR, cell_id_of, cells, pending, quant_config, read_cells
from lth.stored import StoredRun

from test_quant import write_store


def test_an_lsq_cell_computed_before_the_fix_is_recomputed_and_replaced_not_reused(tmp_path):
    run_dir = write_store(tmp_path)
    kw = dict(arms=("ticket",), learned_scale=True, qat_steps=2)
    first = quantize_run(run_dir, [1], (4,), ("qat", "ptq"), **kw)
    assert set(first["method"]) == {"qat", "ptq", "float_ft"}
    cfg = StoredRun.open(run_dir).cfg
    qc = quant_config(None, bits=[4], method=["qat", "ptq"], **kw)
    by_method = {c.setting.method: c for c in cells(cfg, qc, [1]) if c.arm == "ticket"}
    qat, ptq = by_method["qat"], by_method["ptq"]
    assert qat.setting.key()["numerics_version"] == 2  # LSQ's numerics changed: the version is in its key
    assert "numerics_version" not in ptq.setting.key()  # unchanged methods keep the ids of their stored cells
    assert "numerics_version" not in by_method["float_ft"].setting.key()

    # the same cell as the code before the fix stored it: the key without a version, another accuracy
    qdir = run_dir / "level_001" / QUANT_DIR
    old_key = qat.setting.key(1)
    old_id = cell_id_of(cfg.run_id, 1, "ticket", old_key)
    assert old_id != qat.id
    rows = pd.read_parquet(qdir / f"{qat.id}.parquet").assign(cell=old_id, accuracy=-1.0)
    data = rows.to_parquet(index=False)
    (qdir / f"{old_id}.parquet").write_bytes(data)
    (qdir / f"{old_id}.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "run_id": cfg.run_id,
                                                     "level": 1, "arm": "ticket", "setting": old_key, "seeds": [0]}))
    for suffix in (".json", ".parquet"):
        (qdir / f"{qat.id}{suffix}").unlink()

    assert [c.id for c in pending(cfg, run_dir, qc, [1])] == [qat.id]  # the stale cell is not reused
    assert set(read_cells(run_dir / "level_001")["method"]) == {"ptq", "float_ft"}  # nor read as current
    said = []
    q = load_quant(tmp_path, say=said.append)
    assert set(q.loc[q["level"] == 1, "method"]) == {"ptq", "float_ft"}
    assert any("computed with qat numerics version 1, now 2" in s and old_id in s for s in said), said
    again = quantize_run(run_dir, [1], (4,), ("qat", "ptq"), **kw)
    assert list(again["method"]) == ["qat"] and (again["accuracy"] >= 0).all()
    assert not (qdir / f"{old_id}.json").exists() and not (qdir / f"{old_id}.parquet").exists()
    stored = read_cells(run_dir / "level_001")
    assert len(stored) == 3 and (stored["accuracy"] >= 0).all()  # one row per cell: no stale duplicate


def test_obd_with_the_fisher_estimate_gets_a_new_run_id_and_stored_runs_keep_theirs():
    fisher = ExperimentConfig.from_dict({"name": "x", "prune": {"criterion": "obd", "hessian": "fisher"}})
    stored = {**fisher.to_dict(), "run_id": "?"}
    stored["prune"] = {k: v for k, v in stored["prune"].items() if k != "numerics_version"}  # written before the fix
    assert legacy_filled(stored)["prune"]["numerics_version"] == 1
    old_id = stored_run_id(stored)
    assert old_id != fisher.run_id  # a new obd-fisher run is not the stored one
    assert fisher.identity_dict()["prune"]["numerics_version"] == 2
    old = ExperimentConfig.from_dict({k: v for k, v in legacy_filled(stored).items() if k != "run_id"})
    assert old.run_id == old_id
    with pytest.raises(ConfigError, match="prune.numerics_version = 1 .*obd/fisher.*only version 2"):
        check_numerics(old)  # readable, never trained further
    check_numerics(fisher)
    # criteria whose numerics did not change keep their ids, with or without the field
    for prune in ({"criterion": "obd"}, {"criterion": "magnitude"}, {}):
        cfg = ExperimentConfig.from_dict({"name": "x", "prune": prune})
        d = cfg.to_dict()
        d["prune"] = {k: v for k, v in d["prune"].items() if k != "numerics_version"}
        assert stored_run_id(d) == cfg.run_id and "numerics_version" not in json.dumps(cfg.identity_dict())

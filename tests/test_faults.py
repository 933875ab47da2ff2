"""Fault suite: kills during store writes, corrupted files, failing runs in a sweep, unwritable output."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from analysis import NotAStoreError, load_runs
from lth.lottery import run_lottery
from lth.store import StoreError, prepare_root
from test_lottery import TINY, _toml, tiny

ROOT = Path(__file__).resolve().parents[1]
SMALL = {**TINY, "prune": {**TINY["prune"], "levels": 2}, "arms": ["ticket", "random_prune"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    cfg = tiny(prune={"levels": 2}, arms=["ticket", "random_prune"])
    run_lottery(cfg, out)
    return cfg, out


def _cli(exp, out, failpoint=None):
    env = {**os.environ}
    env.pop("LTH_FAILPOINT", None)
    if failpoint:
        env["LTH_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "lth.cli", "lottery", str(exp), "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("failpoint", [
    "write:level_001/final.msgpack",  # killed half-way through writing a weights file
    "after:level_001/masks.msgpack",  # killed between two files of a level
])
def test_sigkill_during_a_store_write_then_rerun_equals_uninterrupted(reference, tmp_path, failpoint):
    cfg, ref = reference
    exp = tmp_path / "small.toml"
    exp.write_text(_toml(SMALL))
    out = tmp_path / "out"
    r = _cli(exp, out, failpoint)
    assert r.returncode == -9, r.stderr  # really killed by SIGKILL
    run = out / cfg.run_id
    assert (run / "level_000" / "COMPLETE").exists() and not (run / "level_001" / "COMPLETE").exists()
    r = _cli(exp, out)
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(load_runs(ref).drop(columns="wall_s"), load_runs(out).drop(columns="wall_s"))
    assert not list(out.rglob("*.tmp"))  # the half-written temp file was cleaned up


def test_corrupt_metrics_file_is_named_by_the_loader_and_recomputed_by_the_rerun(reference, tmp_path):
    import shutil
    cfg, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    metrics = out / cfg.run_id / "level_002" / "metrics.parquet"
    metrics.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(NotAStoreError, match="level_002/metrics.parquet"):
        load_runs(out)
    exp = tmp_path / "small.toml"
    exp.write_text(_toml(SMALL))
    assert _cli(exp, out).returncode == 0
    pd.testing.assert_frame_equal(load_runs(ref).drop(columns="wall_s"), load_runs(out).drop(columns="wall_s"))


def test_a_failing_run_is_reported_and_the_sweep_continues(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep.toml"
    d = {**SMALL, "prune": {**SMALL["prune"], "levels": 1}}
    sweep.write_text(_toml(d) + '[sweep]\n"data.name" = ["mnist", "mnist1d"]\n')
    env = {**os.environ, "LTH_DATA_DIR": str(tmp_path / "no_data")}
    r = subprocess.run([sys.executable, "-m", "lth.cli", "sweep", str(sweep), "--out", str(tmp_path / "o"),
                        "--no-progress"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1  # a failed run makes the sweep exit non-zero, after finishing the others
    status = {line.split()[1] for line in r.stdout.splitlines() if len(line.split()) > 2}
    assert "failed" in status and "trained" in status
    assert "data set not found" in r.stdout
    assert load_runs(tmp_path / "o")["data.name"].unique().tolist() == ["mnist1d"]


def test_unwritable_output_folder_is_a_clear_error(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(StoreError, match="is not writable"):
        prepare_root(tmp_path / "ro")

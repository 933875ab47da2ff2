"""Fault suite: kills during store writes, corrupted files, failing runs in a sweep, unwritable output."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from analysis import load_runs
from lth.lottery import run_lottery
from lth.store import StoreError, prepare_root
from helpers import TINY, toml_text, tiny

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
@pytest.mark.slow
def test_sigkill_during_a_store_write_then_rerun_equals_uninterrupted(reference, tmp_path, failpoint):
    cfg, ref = reference
    exp = tmp_path / "small.toml"
    exp.write_text(toml_text(SMALL))
    out = tmp_path / "out"
    r = _cli(exp, out, failpoint)
    assert r.returncode == -9, r.stderr  # really killed by SIGKILL
    run = out / cfg.run_id
    assert (run / "level_000" / "COMPLETE").exists() and not (run / "level_001" / "COMPLETE").exists()
    r = _cli(exp, out)
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(load_runs(ref).drop(columns="wall_s"), load_runs(out).drop(columns="wall_s"))
    assert not list(out.rglob("*.tmp"))  # the half-written temp file was cleaned up


@pytest.mark.slow
def test_corrupt_metrics_file_is_named_by_the_loader_and_recomputed_by_the_rerun(reference, tmp_path):
    import shutil
    cfg, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    metrics = out / cfg.run_id / "level_002" / "metrics.parquet"
    metrics.write_bytes(b"PAR1 this is not parquet")
    said = []
    assert 2 not in set(load_runs(out, say=said.append)["level"])  # skipped, and said so naming the file
    assert len(said) == 1 and "level_002/metrics.parquet does not match its checksum" in said[0]
    exp = tmp_path / "small.toml"
    exp.write_text(toml_text(SMALL))
    assert _cli(exp, out).returncode == 0
    pd.testing.assert_frame_equal(load_runs(ref).drop(columns="wall_s"), load_runs(out).drop(columns="wall_s"))


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_sweep_continues(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep.toml"
    d = {**SMALL, "prune": {**SMALL["prune"], "levels": 1}}
    sweep.write_text(toml_text(d) + '[sweep]\n"data.name" = ["mnist", "mnist1d"]\n')
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


def _copy(ref, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    return out


@pytest.mark.slow
def test_damaged_init_is_recomputed_and_a_damaged_rewind_point_is_refused(reference, tmp_path):
    from lth.store import RunStore
    cfg, ref = reference
    out = _copy(ref, tmp_path)
    run = out / cfg.run_id
    init = run / "init.msgpack"
    blob = bytearray(init.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a flipped byte inside a weight: still a readable file
    init.write_bytes(bytes(blob))
    import shutil
    shutil.rmtree(run / "level_002")
    exp = tmp_path / "small.toml"
    exp.write_text(toml_text(SMALL))
    r = _cli(exp, out)
    assert r.returncode == 0, r.stderr
    assert "init.msgpack does not match its checksum" in r.stderr
    pd.testing.assert_frame_equal(load_runs(ref).drop(columns="wall_s"), load_runs(out).drop(columns="wall_s"))
    # a file that cannot be recomputed alone (the rewind point k > 0) is refused, naming it
    store = RunStore(out, cfg.run_id)
    store.write_tree("rewind.msgpack", {"w": [1.0, 2.0]})
    path = run / "rewind.msgpack"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StoreError, match="rewind.msgpack does not match its checksum"):
        store.read_tree("rewind.msgpack")


def test_edited_hparams_is_an_error_for_report_and_rerun(reference, tmp_path):
    import json
    cfg, ref = reference
    out = _copy(ref, tmp_path)
    path = out / cfg.run_id / "hparams.json"
    h = json.loads(path.read_text())
    h["train"]["lr"] = 0.5
    path.write_text(json.dumps(h))
    with pytest.raises(StoreError, match="hparams.json: its settings hash to run id"):
        load_runs(out)
    import shutil
    shutil.rmtree(out / cfg.run_id / "level_002")
    exp = tmp_path / "small.toml"
    exp.write_text(toml_text(SMALL))
    r = _cli(exp, out)
    assert r.returncode == 2 and "hparams.json: its settings hash to run id" in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_store_files_honour_the_umask(tmp_path):
    from lth.store import atomic_write_bytes
    old = os.umask(0o002)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o664


def test_disk_full_is_a_store_error_naming_the_file_and_leaves_the_old_file(tmp_path, monkeypatch):
    import errno
    from lth.store import atomic_write_bytes
    target = tmp_path / "level_000" / "final.msgpack"
    atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match=r"final.msgpack: cannot write \(No space left on device\)"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_report_verifies_checksums_and_says_what_it_skipped(reference, tmp_path):
    cfg, ref = reference
    out = _copy(ref, tmp_path)
    final = out / cfg.run_id / "level_001" / "final.msgpack"
    blob = bytearray(final.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # still readable, but not what was trained
    final.write_bytes(bytes(blob))
    (out / cfg.run_id / "level_002" / "COMPLETE").unlink()
    r = subprocess.run([sys.executable, "-m", "lth.cli", "report", str(out), "--out", str(tmp_path / "figs")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipped level_001" in r.stderr and "final.msgpack does not match its checksum" in r.stderr
    assert "skipped level_002" in r.stderr and "no COMPLETE marker" in r.stderr
    summary = pd.read_csv(tmp_path / "figs" / "summary.csv")
    assert set(summary["level"]) == {0}


def test_a_store_without_manifest_stays_readable_and_its_first_manifest_adopts_its_files(tmp_path):
    from lth.store import MANIFEST, RunStore
    store = RunStore(tmp_path, "run")
    store.write_tree("init.msgpack", {"w": [1.0]})
    (store.path / MANIFEST).unlink()  # as written by an older lth
    assert store.read_tree("init.msgpack")["w"] is not None
    store.write_tree("rewind.msgpack", {"w": [2.0]})
    assert store.file_problem("init.msgpack") is None and store.file_problem("rewind.msgpack") is None

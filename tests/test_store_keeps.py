"""Growing, migrating and reading a stored run lose nothing and say what they skip (issue 23, items
7-9, 16, 17): files added to a level survive a grow and a migrate, a damaged rewind file is refused
before a grow, a level swap a kill left half done is finished by every command that meets it, lock
files honour the umask, and the readers skip a damaged file with a line naming it."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import load_runs, load_speed
from analysis.masks import mask_analysis
from lth.config import ExperimentConfig
from lth.lottery import run_lottery
from lth.migrate import migrate
from lth.pipeline import run_experiment
from lth.store import RunStore, StoreError
from helpers import tiny

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(seeds=[0], arms=["ticket"], prune={"levels": 1}, rewind={"step": 10},
                train={"steps": 20, "eval_every": 20})


def _cfg(**over) -> ExperimentConfig:
    return tiny(**{**SETTINGS, **over})


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A run of 2 levels with a rewind point k > 0."""
    out = tmp_path_factory.mktemp("keeps")
    cfg = _cfg()
    run_experiment(cfg, out)
    return cfg, out


def _copy(stored, tmp_path):
    cfg, out = stored
    shutil.copytree(out, tmp_path / "out")
    return cfg, tmp_path / "out", tmp_path / "out" / cfg.run_id


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _levels(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("level"))


def _python(code: str, *args, failpoint: str | None = None):
    """Run ``code`` in a fresh interpreter (killed by SIGKILL at ``failpoint``)."""
    env = {k: v for k, v in os.environ.items() if k != "LTH_FAILPOINT"}
    env.update({"PYTHONPATH": str(ROOT), **({"LTH_FAILPOINT": failpoint} if failpoint else {})})
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


# the level rewritten with its own files: the swap a grow does, killed at a failpoint
_REWRITE = """
import sys
from pathlib import Path
from lth.store import COMPLETE, RunStore, read_json
run, level = Path(sys.argv[1]), int(sys.argv[2])
store = RunStore(run.parent, run.name)
d = store.level_dir(level)
store.write_level(level, {n: (d / n).read_bytes() for n in read_json(d / COMPLETE)["sha256"]})
"""


# ------------------------------------------------------------------ 7: every file of a level survives

def test_files_added_to_a_level_survive_a_seed_grow_and_a_migrate(stored, tmp_path):
    cfg, out, run = _copy(stored, tmp_path)
    d = run / "level_001"
    speed = pd.DataFrame({"run_id": [cfg.run_id], "member": [0], "format": ["dense"], "batch": [1]})
    speed.to_parquet(d / "speed.parquet", index=False)
    (d / "sensitivity.parquet").write_bytes(b"table")
    (d / "sensitivity.pdf").write_bytes(b"figure")
    before = {n: _sha(d / n) for n in ("speed.parquet", "sensitivity.parquet", "sensitivity.pdf")}
    run_lottery(_cfg(seeds=[0, 1]), out)  # grows every level by a seed: each is rebuilt and swapped in
    assert [m["seed"] for m in json.loads((d / "members.json").read_text())] == [0, 1]  # it did grow
    assert {n: _sha(d / n) for n in before} == before  # the stored members' files, kept as they were
    # lth migrate rebuilds a level too: the added files are carried across, the run id rewritten in them
    store = RunStore(out, "legacy")
    (out / "legacy" / "level_000").mkdir(parents=True)
    pd.DataFrame({"run_id": ["legacy"], "x": [1]}).to_parquet(out / "legacy" / "level_000" / "metrics.parquet")
    store.write_level(0, {"metrics.parquet": (out / "legacy" / "level_000" / "metrics.parquet").read_bytes()})
    speed.assign(run_id="legacy").to_parquet(store.level_dir(0) / "speed.parquet", index=False)
    (store.level_dir(0) / "sensitivity.pdf").write_bytes(b"figure")
    (out / "legacy" / "hparams.json").write_text("{}")
    from lth.migrate import Move, migrate_run
    migrate_run(Move(out / "legacy", out / "renamed"))
    level = out / "renamed" / "level_000"
    assert (level / "sensitivity.pdf").read_bytes() == b"figure"
    assert list(pd.read_parquet(level / "speed.parquet")["run_id"]) == ["renamed"]
    assert list(pd.read_parquet(level / "metrics.parquet")["run_id"]) == ["renamed"]


# ------------------------------------------------------------------ 8: a damaged rewind file is refused

def test_a_damaged_rewind_file_is_refused_before_a_grow_and_left_as_it_was(stored, tmp_path):
    cfg, out, run = _copy(stored, tmp_path)
    path = run / "rewind.msgpack"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    levels = {L: _sha(run / f"level_{L:03d}" / "COMPLETE") for L in (0, 1)}
    for grow in (run_lottery, run_experiment):  # alone, and through the pipeline (population groups)
        with pytest.raises(StoreError, match=r"rewind.msgpack does not match its checksum.*delete .*level_000"):
            grow(_cfg(seeds=[0, 1]), out)
    assert path.read_bytes() == bytes(blob)  # not rewritten with the new seed's rewind point only
    assert {L: _sha(run / f"level_{L:03d}" / "COMPLETE") for L in (0, 1)} == levels  # nothing trained


# ------------------------------------------------------------------ 9: a kill during a swap or a migrate

def test_a_half_done_level_swap_is_finished_by_quantize_and_by_a_finished_rerun(stored, tmp_path):
    from lth.quant import quantize_run
    cfg, out, run = _copy(stored, tmp_path)
    r = _python(_REWRITE, run, 1, failpoint="swap:level_001")  # old level moved aside, new one not in place
    assert r.returncode == -9, r.stderr
    assert _levels(run) == ["level_000", "level_001.next", "level_001.prev"]
    rows = quantize_run(run, bits_list=[4], methods=["ptq"])  # finishes the swap, then quantizes every level
    assert sorted(set(rows["level"])) == [0, 1] and _levels(run) == ["level_000", "level_001"]
    r = _python(_REWRITE, run, 0, failpoint="swapped:level_000")  # new level in place, .prev left behind
    assert r.returncode == -9, r.stderr
    assert "level_000.prev" in _levels(run)
    run_lottery(cfg, out)  # the run is found finished: the leftover is removed all the same
    assert _levels(run) == ["level_000", "level_001"]


def test_an_interrupted_migrate_shows_one_run_id_per_folder_and_says_so(stored, tmp_path):
    cfg, out, run = _copy(stored, tmp_path)
    legacy = out / cfg.legacy_run_id  # the same run as written before runs could grow
    h = json.loads((run / "hparams.json").read_text())
    (run / "hparams.json").write_text(json.dumps({**h, "run_id": cfg.legacy_run_id}))
    for d in sorted(run.glob("level_*")):
        pd.read_parquet(d / "metrics.parquet").assign(run_id=cfg.legacy_run_id).to_parquet(d / "metrics.parquet")
        sums = json.loads((d / "COMPLETE").read_text())
        sums["sha256"]["metrics.parquet"] = _sha(d / "metrics.parquet")
        (d / "COMPLETE").write_text(json.dumps(sums))
    run.rename(legacy)
    r = _python("import sys; from lth.migrate import migrate; migrate(sys.argv[1])", out,
                failpoint="built:level_001.next")  # level 0 migrated, level 1 not yet
    assert r.returncode == -9, r.stderr
    said = []
    df = load_runs(out, say=said.append)
    assert set(df["run_id"]) == {cfg.legacy_run_id}  # one run id for the folder
    assert any("level_000/metrics.parquet records run id" in s and "lth migrate" in s for s in said), said
    migrate(out, say=lambda s: None)  # the rerun finishes it
    assert set(load_runs(out, say=said.append)["run_id"]) == {cfg.run_id}


# ------------------------------------------------------------------ 16: lock files in a group-shared store

def test_the_lock_file_honours_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        with RunStore(tmp_path, "r").lock():
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "r" / ".lock").stat().st_mode & 0o777 == 0o664  # group members can take the lock too


# ------------------------------------------------------------------ 17: damaged files are named and skipped

def test_readers_skip_a_damaged_file_naming_it_and_lth_speed_recomputes_it(stored, tmp_path):
    from lth.speed import measure_run
    cfg, out, run = _copy(stored, tmp_path)
    d = run / "level_001"
    (d / "quant").mkdir()
    cell = d / "quant" / "0123abcd.parquet"
    pd.DataFrame({"run_id": [cfg.run_id], "cell": ["0123abcd"], "level": [1], "arm": ["ticket"], "seed": [0],
                  "bits": [8], "method": ["ptq"], "accuracy": [0.5]}).to_parquet(cell)
    (d / "quant" / "0123abcd.json").write_text(json.dumps({"sha256": _sha(cell)}))
    assert (load_runs(out, say=print)["method"] == "ptq").sum() == 1
    cell.write_bytes(cell.read_bytes()[:-10])  # the quant cell damaged
    said = []
    df = load_runs(out, say=said.append)
    assert (df["method"] == "ptq").sum() == 0 and any(str(cell) in s for s in said), said
    # a truncated speed table: the report reads the rest, lth speed measures the level again
    measure_run(run, [0, 1], batches=[1], formats=["dense"], repeats=1, min_time=0.0)
    speed = d / "speed.parquet"
    speed.write_bytes(speed.read_bytes()[:40])
    said = []
    assert set(load_speed(out, say=said.append)["level"]) == {0}
    assert any(str(speed) in s for s in said), said
    measure_run(run, [1], batches=[1], formats=["dense"], repeats=1, min_time=0.0)
    assert list(pd.read_parquet(speed)["level"]) == [1]
    # a checksummed members.json without a seed: the level is skipped, naming the file
    members = d / "members.json"
    members.write_text(json.dumps([{"arm": "ticket"}]))
    sums = json.loads((d / "COMPLETE").read_text())
    sums["sha256"]["members.json"] = _sha(members)
    (d / "COMPLETE").write_text(json.dumps(sums))
    said = []
    tables = mask_analysis(out, say=said.append)
    assert set(tables["ticket"]["level"]) == {0} and any(str(members) in s for s in said), said
    with pytest.raises(StoreError, match=r"members.json: member 0 is \{'arm': 'ticket'\}; expected"):
        measure_run(run, [1], batches=[1], formats=["dense"], repeats=1, min_time=0.0)

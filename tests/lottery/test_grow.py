"""Runs that grow: more levels, seeds or arms train only the missing members and keep the rest bit for bit."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from analysis import load_runs
from lth.cli import main as cli_main
from lth.lottery import run_lottery
from lth.lottery.runner import Lottery, run_is_finished
from lth.pipeline import run_experiment, run_status
from lth.quant import read_cells
from lth.quant.stage import cell_id_of
from lth.store import RunStore, StoreError, load_tree, stacked_seeds, tree_bytes
from lth.sweep import expand, status_of
from lth.train import Engine
from helpers import TINY, tiny, toml_text

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(seeds=[0], arms=["ticket", "reinit"], prune={"levels": 1})
BIG = dict(seeds=[0, 1], arms=["ticket", "reinit", "small_dense"], prune={"levels": 2})


def _files(level_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(level_dir.iterdir()) if p.is_file()}


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)})
    return out


# a member's numbers do not depend on its population on CPU (one member at a time: exact); vmapped
# populations of another size may round differently (the engine's population tolerance)
EXACT = jax.default_backend() == "cpu"
TOL = {} if EXACT else {"check_exact": False, "rtol": 1e-4, "atol": 1e-5}


def _equal(a, b):
    if EXACT:
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _members(level_dir: Path):
    return [(m["arm"], m["seed"]) for m in json.loads((level_dir / "members.json").read_text())]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """SMALL (1 seed, 2 arms, 1 level) -> 2 levels -> BIG (2 seeds, + small_dense, 2 levels); and BIG fresh."""
    out = tmp_path_factory.mktemp("grow")
    small = tiny(**SMALL)
    store = run_lottery(small, out)
    before = {L: _files(store.level_dir(L)) for L in range(2)}
    arrays = {L: {n: _flat(load_tree(store.level_dir(L) / n)) for n in ("final.msgpack", "masks.msgpack")}
              for L in range(2)}
    metrics = {L: pd.read_parquet(store.level_dir(L) / "metrics.parquet") for L in range(2)}
    init_before = _flat(stacked_seeds(load_tree(store.path / "init.msgpack"))[0])

    longer = tiny(**{**SMALL, "prune": {"levels": 2}})
    assert longer.run_id == small.run_id  # levels are not part of the run id
    lot = Lottery(longer, out)
    lot.run()
    trained_longer = list(lot.trained_levels)
    after_longer = {L: _files(store.level_dir(L)) for L in range(2)}

    big = tiny(**BIG)
    assert big.run_id == small.run_id
    dry = [s for _, s in status_of(expand_cfg(big, tmp_path_factory), out)]
    trained: list = []
    real_run = Engine.run

    def spy(self, state, seeds, **kw):
        trained.append(tuple(seeds))
        return real_run(self, state, seeds, **kw)

    Engine.run = spy
    try:
        lot = Lottery(big, out)
        lot.run()
    finally:
        Engine.run = real_run
    fresh = run_lottery(big, tmp_path_factory.mktemp("fresh"))
    return dict(store=store, before=before, arrays=arrays, metrics=metrics, init_before=init_before,
                trained_longer=trained_longer, after_longer=after_longer, trained=trained, fresh=fresh, big=big,
                dry=dry, out=out)


def expand_cfg(cfg, tmp_path_factory):
    exp = tmp_path_factory.mktemp("exp") / "e.toml"
    raw = {**TINY, **{k: v for k, v in BIG.items() if k != "prune"}, "prune": {**TINY["prune"], **BIG["prune"]}}
    exp.write_text(toml_text(raw))
    points = expand(exp)
    assert points[0].cfg == cfg
    return points


def test_more_levels_train_only_the_new_level_and_keep_old_level_files_byte_identical(grown):
    assert grown["trained_longer"] == [2]
    assert grown["after_longer"] == grown["before"]  # every file of levels 0 and 1, byte for byte


def test_more_seeds_and_an_arm_train_only_the_missing_members(grown):
    # level 0: the new seed's dense net; level 1: seed 1's ticket + reinit, then small-dense of both
    # seeds; level 2: both seeds' ticket and reinit (seed 0's level 2 was trained by the 2-level run)
    assert grown["trained"] == [(1,), (1, 1), (0, 1), (1, 1), (0, 1)]
    assert grown["dry"] == ["grow: 1 seed, 1 arm to add (0/3 levels done)"]
    store = grown["store"]
    assert _members(store.level_dir(1)) == [("ticket", 0), ("reinit", 0), ("ticket", 1), ("reinit", 1)]
    sd = json.loads((store.level_dir(1) / "small_dense.json").read_text())
    assert [(m["arm"], m["seed"]) for m in sd] == [("small_dense", 0), ("small_dense", 1)]


def test_old_members_arrays_and_rows_are_unchanged_bit_for_bit(grown):
    store = grown["store"]
    for L in range(2):
        for name, before in grown["arrays"][L].items():
            now = _flat(load_tree(store.level_dir(L) / name))
            for key, a in before.items():
                old_k = a.shape[0]
                np.testing.assert_array_equal(now[key][:old_k], a)  # the stored members keep index and bits
                assert now[key].shape[0] == old_k + (1 if L == 0 else 2)
        m0, m1 = grown["metrics"][L], pd.read_parquet(store.level_dir(L) / "metrics.parquet")
        pd.testing.assert_frame_equal(m1.iloc[:len(m0)][list(m0.columns)], m0)
    init = stacked_seeds(load_tree(store.path / "init.msgpack"))
    assert init[1] == [0, 1]
    for key, a in grown["init_before"].items():
        np.testing.assert_array_equal(_flat(init[0])[key][:1], a)


def test_grown_run_equals_a_fresh_run_of_the_final_config_member_by_member(grown):
    store, fresh = grown["store"], grown["fresh"]
    keys = ["level", "arm", "seed", "step", "split"]
    for L in range(3):
        a = pd.read_parquet(store.level_dir(L) / "metrics.parquet").sort_values(keys).reset_index(drop=True)
        b = pd.read_parquet(fresh.level_dir(L) / "metrics.parquet").sort_values(keys).reset_index(drop=True)
        cols = ["loss", "accuracy", "density", "param_count"]
        pd.testing.assert_frame_equal(a[keys + cols], b[keys + cols], **TOL)
        ma, mb = _members(store.level_dir(L)), _members(fresh.level_dir(L))
        fa, fb = _flat(load_tree(store.level_dir(L) / "final.msgpack")), _flat(load_tree(fresh.level_dir(L) / "final.msgpack"))
        for key in fa:
            for i, m in enumerate(ma):
                _equal(fa[key][i], fb[key][mb.index(m)])


def test_a_grown_run_is_finished_and_a_rerun_of_a_subset_trains_nothing(grown):
    store, big = grown["store"], grown["big"]
    for cfg in (big, tiny(**SMALL), tiny(seeds=[1], arms=["ticket"], prune={"levels": 2})):
        s = run_status(cfg, grown["out"])
        assert s["levels"] == s["of"] and s["seeds"] == s["arms"] == 0
        assert run_is_finished(store, cfg)
    assert not run_is_finished(store, tiny(seeds=[2], arms=["ticket"], prune={"levels": 1}))
    assert not run_is_finished(store, tiny(**{**BIG, "prune": {"levels": 3}}))
    assert json.loads((store.path / "hparams.json").read_text())["seeds"] == [0, 1]
    df = load_runs(grown["out"])
    assert set(df[df.level == 1].arm) == {"ticket", "reinit", "small_dense"} and set(df.seed) == {0, 1}


# ------------------------------------------------------------------ crash safety of the level swap

_SWAP = """
import sys
from lth.store import RunStore
s = RunStore(sys.argv[1], "r")
s.write_level(0, {"a.bin": sys.argv[2].encode()})
"""


@pytest.mark.parametrize("failpoint, expect", [
    ("built:level_000.next", "old"),  # the new level was not complete: rolled back
    ("swap:level_000", "new"),  # old moved aside, new complete but not in place: finished
    ("swapped:level_000", "new"),  # new in place, .prev left behind: removed
])
def test_a_kill_in_the_middle_of_a_level_swap_is_repaired_when_the_store_is_opened(tmp_path, failpoint, expect):
    store = RunStore(tmp_path, "r")
    store.write_level(0, {"a.bin": b"old"})
    (store.level_dir(0) / "quant").mkdir()
    (store.level_dir(0) / "quant" / "cell.json").write_text("{}")
    env = {**os.environ, "LTH_FAILPOINT": failpoint, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _SWAP, str(tmp_path), "new"], env=env, capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert not store.is_complete(0) or list(tmp_path.glob("r/level_000.*"))  # left half done
    with store.lock():  # opening the store for writing repairs it
        pass
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith("level")) == ["level_000"]
    assert store.is_complete(0) and (store.level_dir(0) / "a.bin").read_bytes() == expect.encode()
    assert (store.level_dir(0) / "quant" / "cell.json").is_file()  # stage folders are carried across


# ------------------------------------------------------------------ legacy stores and lth migrate

def _make_legacy(out: Path, cfg) -> Path:
    """Turn a run written now into one written before runs could grow: legacy folder name and run id,
    no seeds record in init.msgpack."""
    run = out / cfg.run_id
    h = json.loads((run / "hparams.json").read_text())
    (run / "hparams.json").write_text(json.dumps({**h, "run_id": cfg.legacy_run_id}))
    init = load_tree(run / "init.msgpack")
    init.pop("seeds")
    (run / "init.msgpack").write_bytes(tree_bytes(init))
    (run / "MANIFEST.json").unlink()  # stores before manifests: read unverified
    for d in sorted(run.glob("level_*")):
        for meta_path in sorted((d / "quant").glob("*.json")):  # cells: ids hash the run id; no seeds record
            meta = json.loads(meta_path.read_text())
            cid = cell_id_of(cfg.legacy_run_id, meta["level"], meta["arm"], meta["setting"])
            q = pd.read_parquet(meta_path.with_suffix(".parquet")).assign(run_id=cfg.legacy_run_id, cell=cid)
            q.to_parquet(d / "quant" / f"{cid}.parquet", index=False)
            sha = hashlib.sha256((d / "quant" / f"{cid}.parquet").read_bytes()).hexdigest()
            meta = {k: v for k, v in meta.items() if k != "seeds"}
            (d / "quant" / f"{cid}.json").write_text(json.dumps({**meta, "run_id": cfg.legacy_run_id, "sha256": sha}))
            meta_path.with_suffix(".parquet").unlink()
            meta_path.unlink()
        m = pd.read_parquet(d / "metrics.parquet").assign(run_id=cfg.legacy_run_id)
        m.to_parquet(d / "metrics.parquet", index=False)
        sums = json.loads((d / "COMPLETE").read_text())
        sums["sha256"]["metrics.parquet"] = hashlib.sha256((d / "metrics.parquet").read_bytes()).hexdigest()
        (d / "COMPLETE").write_text(json.dumps(sums))
    legacy = out / cfg.legacy_run_id
    run.rename(legacy)
    return legacy


def test_a_legacy_store_is_readable_and_lth_migrate_moves_it_so_a_rerun_trains_nothing(tmp_path, capsys):
    cfg = tiny(seeds=[0], arms=["ticket"], prune={"levels": 1}, quant={"bits": [8], "method": ["ptq"], "levels": [1]})
    run_experiment(cfg, tmp_path)
    ref = load_runs(tmp_path)
    assert (ref.method == "ptq").sum() == 1
    legacy = _make_legacy(tmp_path, cfg)
    old = load_runs(tmp_path)  # readable under its legacy name
    assert set(old.run_id) == {cfg.legacy_run_id}
    pd.testing.assert_frame_equal(old.drop(columns=["run_id", "cell"]), ref.drop(columns=["run_id", "cell"]))
    assert cli_main(["report", str(tmp_path), "--out", str(tmp_path / "fig")]) == 0
    assert cli_main(["migrate", str(tmp_path), "--dry-run"]) == 0
    assert f"would move {legacy} -> {tmp_path / cfg.run_id}" in capsys.readouterr().out and legacy.is_dir()
    # another folder holding the new id: refused, naming both, nothing moved
    (tmp_path / cfg.run_id).mkdir()
    assert cli_main(["migrate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(legacy) in err and str(tmp_path / cfg.run_id) in err and legacy.is_dir()
    (tmp_path / cfg.run_id).rmdir()
    assert cli_main(["migrate", str(tmp_path)]) == 0
    assert not legacy.exists()
    pd.testing.assert_frame_equal(load_runs(tmp_path), ref)  # the run id is rewritten where it is recorded
    lot = Lottery(cfg, tmp_path)
    lot.run()
    assert lot.trained_levels == []  # found complete under its new id: trains nothing
    assert run_status(cfg, tmp_path)["cells"] == 0  # its quant cell too
    # and it grows like any run: the seeds of its init come from hparams.json
    grown = Lottery(tiny(seeds=[0, 1], arms=["ticket"], prune={"levels": 1}), tmp_path)
    grown.run()
    assert grown.trained_levels == [0, 1]
    assert stacked_seeds(load_tree(tmp_path / cfg.run_id / "init.msgpack"))[1] == [0, 1]


def test_check_hparams_still_catches_an_edited_learning_rate_under_both_schemes(tmp_path):
    from lth.store import check_hparams
    cfg = tiny()
    h = cfg.to_dict()
    check_hparams(tmp_path / cfg.run_id / "hparams.json", h)
    check_hparams(tmp_path / cfg.legacy_run_id / "hparams.json", h)
    h["train"]["lr"] = 0.5
    for rid in (cfg.run_id, cfg.legacy_run_id):
        with pytest.raises(StoreError, match="hash to run id"):
            check_hparams(tmp_path / rid / "hparams.json", h)


# ------------------------------------------------------------------ quant cells grow with seeds

def test_a_quant_cell_grows_with_seeds_computing_only_the_new_seed(tmp_path, monkeypatch):
    from lth.quant.stage import QuantStage
    quant = {"bits": [8], "method": ["ptq"], "levels": [0]}
    one = tiny(seeds=[0], arms=["ticket"], prune={"levels": 0}, quant=quant)
    run_experiment(one, tmp_path)
    d = tmp_path / one.run_id / "level_000"
    before = read_cells(d)
    assert list(before.seed) == [0]
    two = tiny(seeds=[0, 1], arms=["ticket"], prune={"levels": 0}, quant=quant)
    assert run_status(two, tmp_path)["cells"] == 1  # the cell over seed 0 is not done for seeds [0, 1]
    computed = []
    real = QuantStage._quantize

    def spy(self, level, pop, setting):
        computed.append(list(pop.members))
        return real(self, level, pop, setting)

    monkeypatch.setattr(QuantStage, "_quantize", spy)
    run_experiment(two, tmp_path)
    assert computed == [[("ticket", 1)]]
    after = read_cells(d)
    assert list(after.seed) == [0, 1] and after.cell.nunique() == 1
    pd.testing.assert_frame_equal(after.iloc[:1], before)  # the stored row, value for value
    meta = json.loads(next((d / "quant").glob("*.json")).read_text())
    assert meta["seeds"] == [0, 1]
    assert run_status(two, tmp_path)["cells"] == 0


# ------------------------------------------------------------------ sweeps

def test_sweep_points_that_differ_only_in_seeds_are_one_run_with_the_union_trained_once(tmp_path, monkeypatch):
    from lth.sweep import groups_of, run_sweep
    raw = {**TINY, "arms": ["ticket"], "prune": {**TINY["prune"], "levels": 0}, "sweep": {"seeds": [[0], [0, 1]]}}
    exp = tmp_path / "s.toml"
    exp.write_text(toml_text(raw))
    points = expand(exp)
    assert len(points) == 2 and points[0].run_id == points[1].run_id  # two points, one run id
    assert groups_of(points) == [[0, 1]]
    trained = []
    real = Engine.run
    monkeypatch.setattr(Engine, "run", lambda self, state, seeds, **kw: trained.append(tuple(seeds))
                        or real(self, state, seeds, **kw))
    outcomes = run_sweep(points, tmp_path / "out")
    assert [o.status for o in outcomes] == ["trained", "trained"] and trained == [(0, 1)]
    assert _members(tmp_path / "out" / points[0].run_id / "level_000") == [("ticket", 0), ("ticket", 1)]
    assert [s for _, s in status_of(points, tmp_path / "out")] == ["complete", "complete"]


@pytest.mark.slow
def test_a_grow_killed_in_the_middle_of_a_level_swap_resumes_to_the_fresh_result(tmp_path):
    raw = {**TINY, "seeds": [0], "arms": ["ticket", "reinit"], "prune": {**TINY["prune"], "levels": 1}}
    exp, more = tmp_path / "one.toml", tmp_path / "two.toml"
    exp.write_text(toml_text(raw))
    more.write_text(toml_text({**raw, "seeds": [0, 1]}))
    out = tmp_path / "out"

    def cli(path, failpoint=None):
        env = {k: v for k, v in os.environ.items() if k != "LTH_FAILPOINT"}
        env.update({"PYTHONPATH": str(ROOT), **({"LTH_FAILPOINT": failpoint} if failpoint else {})})
        return subprocess.run([sys.executable, "-m", "lth.cli", "lottery", str(path), "--out", str(out),
                               "--no-progress"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)

    assert cli(exp).returncode == 0
    r = cli(more, "swap:level_001")  # level 1 grows: killed with the old level moved aside
    assert r.returncode == -9, r.stderr
    run = next(p for p in out.iterdir() if p.is_dir())
    assert not (run / "level_001").exists() and (run / "level_001.prev").is_dir()
    r = cli(more)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("level")) == ["level_000", "level_001"]
    fresh = run_lottery(tiny(seeds=[0, 1], arms=["ticket", "reinit"], prune={"levels": 1}), tmp_path / "fresh")
    keys = ["level", "arm", "seed", "step", "split", "loss", "accuracy"]
    for L in range(2):
        a = pd.read_parquet(run / f"level_{L:03d}" / "metrics.parquet")[keys].sort_values(keys[:5])
        b = pd.read_parquet(fresh.level_dir(L) / "metrics.parquet")[keys].sort_values(keys[:5])
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), **TOL)


def test_the_dense_levels_early_bird_table_grows_with_the_seeds(grown):
    """earlybird.parquet (per seed, level 0) keeps the stored seed's rows and gains the new seed's."""
    store, fresh = grown["store"], grown["fresh"]
    keys = ["seed", "epoch", "step", "layer"]
    a = pd.read_parquet(store.level_dir(0) / "earlybird.parquet")
    b = pd.read_parquet(fresh.level_dir(0) / "earlybird.parquet")
    assert sorted(set(a["seed"])) == [0, 1] and len(a) == len(b)
    pd.testing.assert_frame_equal(a.sort_values(keys, ignore_index=True), b.sort_values(keys, ignore_index=True),
                                  **TOL)

"""What lth reads from a store, an export or the command line (issue 23 items 1-6): names read from
store files stay inside their folder and have the expected types; every stage checks the data
fingerprint; stored seeds are looked up by value; run-level weights are verified on every read; no code
named inside a file is imported; user code is checked when work starts."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from lth.store import RunStore, StoreError, load_tree, tree_bytes, with_seeds
from helpers import tiny


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A tiny finished run (seeds 0 and 1, ticket only, levels 0-1)."""
    from lth.lottery import run_lottery
    out = tmp_path_factory.mktemp("ref")
    cfg = tiny(seeds=[0, 1], arms=["ticket"], prune={"levels": 1},
               train={"steps": 20, "eval_every": 20, "batch_size": 50})
    run_lottery(cfg, out)
    return cfg, out


def _copy(stored, tmp_path):
    cfg, ref = stored
    out = tmp_path / "runs"
    shutil.copytree(ref, out)
    return out / cfg.run_id


def _reseal(level_dir):
    """Recompute the level's COMPLETE checksums (a crafted or hand-edited level that still verifies)."""
    c = json.loads((level_dir / "COMPLETE").read_text())
    for name in c["sha256"]:
        c["sha256"][name] = hashlib.sha256((level_dir / name).read_bytes()).hexdigest()
    (level_dir / "COMPLETE").write_text(json.dumps(c))


# ----------------------------------------------------------------------------- 3: names read from store files

def test_a_complete_entry_outside_its_folder_makes_the_level_unusable_and_is_never_read_or_written(stored, tmp_path):
    run = _copy(stored, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = run / "level_001"
    c = json.loads((d / "COMPLETE").read_text())
    c["sha256"]["../../victim.txt"] = hashlib.sha256(b"precious").hexdigest()
    (d / "COMPLETE").write_text(json.dumps(c))
    problem = RunStore(run.parent, run.name).level_problem(1)
    assert problem is not None and "COMPLETE: entry '../../victim.txt' is not a file name in its folder" in problem
    c["sha256"] = {str(victim): hashlib.sha256(b"precious").hexdigest(), **c["sha256"]}
    c["sha256"].pop("../../victim.txt")
    (d / "COMPLETE").write_text(json.dumps(c))
    assert "is not a file name in its folder" in RunStore(run.parent, run.name).level_problem(1)
    (d / "COMPLETE").write_text(json.dumps({"sha256": {"masks\u0000.msgpack": "0" * 64}}))  # was a ValueError
    assert "is not a file name in its folder" in RunStore(run.parent, run.name).level_problem(1)
    # the manifest of run-level files is held to the same rule
    m = json.loads((run / "MANIFEST.json").read_text())
    m["sha256"]["/etc/passwd"] = "0" * 64
    (run / "MANIFEST.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match=r"MANIFEST.json: entry '/etc/passwd' is not a file name"):
        RunStore(run.parent, run.name).read_tree("init.msgpack")


@pytest.mark.parametrize("members", [
    [{"arm": "ticket", "seed": "zero"}],  # a seed that is no integer
    [{"arm": "ticket"}, {"arm": "ticket", "seed": 1}],  # a member without a seed
    {"arm": "ticket", "seed": 0},  # not a list
])
def test_a_malformed_members_file_is_one_error_naming_it(stored, tmp_path, members):
    from analysis.masks import mask_analysis
    from lth.lottery.runner import read_members
    run = _copy(stored, tmp_path)
    d = run / "level_001"
    (d / "members.json").write_text(json.dumps(members))
    _reseal(d)  # the checksums match: only the entries are wrong
    said = []
    tables = mask_analysis(run.parent, say=said.append)  # the report skips the level, naming the file
    assert 1 not in set(tables["ticket"]["level"])
    assert len(said) == 1 and "level_001/members.json" in said[0] and "\n" not in said[0]
    with pytest.raises(StoreError, match=r"level_001/members.json: ") as e:
        read_members(d)  # what lottery, status and the stages read: an error, before any work
    assert "\n" not in str(e.value)


def test_a_seeds_record_that_does_not_fit_the_file_is_an_error_naming_it(stored, tmp_path):
    from lth.stored import seed_weights
    run = _copy(stored, tmp_path)
    store = RunStore(run.parent, run.name)
    tree = dict(load_tree(run / "init.msgpack"))
    store.write_tree("init.msgpack", {**tree, "seeds": np.asarray([0, 0], np.int64)})  # checksum recorded
    with pytest.raises(StoreError, match=r"init.msgpack: its seeds record \[0, 0\] is not 2 distinct integers"):
        seed_weights(store, "init.msgpack", [0, 1])


# ----------------------------------------------------------------------------- 4: every stage checks the data

def _other_data(run):
    """hparams.json as if the run had been trained on other data (the fingerprint is not in the run id)."""
    path = run / "hparams.json"
    h = json.loads(path.read_text())
    h["data_fingerprint"] = {**h["data_fingerprint"], "sha256": "0123456789abcdef"}
    path.write_text(json.dumps(h))


@pytest.mark.parametrize("stage", ["quantize", "stability", "sensitivity", "export"])
def test_every_stage_refuses_a_run_computed_on_other_data(stored, tmp_path, stage):
    run = _copy(stored, tmp_path)
    _other_data(run)
    if stage == "quantize":
        from lth.quant import quantize_run
        call = lambda: quantize_run(run, [1], [8], ["ptq"])  # noqa: E731
    elif stage == "stability":
        from lth.lottery.stability import rewind_stability
        call = lambda: rewind_stability(run, 1, [0], points=3)  # noqa: E731
    elif stage == "sensitivity":
        from lth.prune.sensitivity import sensitivity
        call = lambda: sensitivity(run, 0, [0.5])  # noqa: E731
    else:
        from lth.quant import export_level
        call = lambda: export_level(run, 1, 8, tmp_path / "t.lthq")  # noqa: E731
    with pytest.raises(StoreError, match=r"hparams.json: run \w+ was computed on other data: stored data "
                                         r"fingerprint .*sha256=0123456789abcdef"):
        call()
    assert not (run / "level_001" / "quant").exists() and not (tmp_path / "t.lthq").exists()


# ----------------------------------------------------------------------------- 5, 6: stored seeds by value, verified

def _reorder_init(run, keep):
    """Rewrite init.msgpack holding the seeds ``keep`` in that order (checksum recorded, as lth would)."""
    store = RunStore(run.parent, run.name)
    tree = dict(load_tree(run / "init.msgpack"))
    held = [int(s) for s in tree.pop("seeds")]
    idx = [held.index(s) for s in keep]
    take = lambda t: {k: take(v) for k, v in t.items()} if isinstance(t, dict) else np.asarray(t)[idx]  # noqa: E731
    store.write_tree("init.msgpack", with_seeds(take(tree), keep))


def test_mask_analysis_finds_each_seeds_init_by_the_files_record(stored, tmp_path):
    from analysis.masks import mask_analysis
    cfg, ref = stored
    before = mask_analysis(ref)["ticket"]
    run = _copy(stored, tmp_path)
    _reorder_init(run, [1, 0])  # the init recomputed in another seed order
    after = mask_analysis(run.parent)["ticket"]
    assert len(before) and before["sign_flip"].notna().all()
    cols = ["seed", "level", "layer", "sign_flip", "jaccard_oneshot_init"]
    np.testing.assert_array_equal(before[cols].to_numpy(), after[cols].to_numpy())
    _reorder_init(run, [1])  # a file holding a subset of the seeds: the others are left out, said so
    said = []
    part = mask_analysis(run.parent, say=said.append)["ticket"]
    assert set(part["seed"]) == {1} and any("holds no init for seeds [0]" in s for s in said)
    np.testing.assert_array_equal(part[cols].to_numpy(), before[before.seed == 1][cols].to_numpy())


def test_mask_analysis_verifies_init_against_the_manifest(stored, tmp_path):
    from analysis.masks import mask_analysis
    run = _copy(stored, tmp_path)
    path = run / "init.msgpack"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # still a readable file, not the init the run trained from
    path.write_bytes(bytes(blob))
    said = []
    assert mask_analysis(run.parent, say=said.append)["ticket"].empty
    assert any("init.msgpack does not match its checksum" in s for s in said), said


def test_stability_and_quantization_take_the_init_of_each_seed_by_value(stored, tmp_path):
    from lth.stored import StoredRun
    cfg, ref = stored
    a = StoredRun.open(ref / cfg.run_id)
    run = _copy(stored, tmp_path)
    _reorder_init(run, [1, 0])
    b = StoredRun.open(run)
    for x, y in zip(jax_leaves(a.weights_file("init.msgpack", [0, 1])),
                    jax_leaves(b.weights_file("init.msgpack", [0, 1]))):
        np.testing.assert_array_equal(x, y)
    _reorder_init(run, [1])
    with pytest.raises(StoreError, match=r"init.msgpack holds seeds \[1\], not \[0\]"):
        b.weights_file("init.msgpack", [0, 1])
    from lth.lottery.stability import rewind_stability
    with pytest.raises(StoreError, match=r"init.msgpack holds seeds \[1\], not \[0\]"):
        rewind_stability(run, 1, [0], points=3)  # no IndexError, no seed 1's init used for seed 0


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------- 1, 2: code named in files and settings

USER = '''
import pathlib
import numpy as np
pathlib.Path(__file__).with_suffix(".imported").write_text("imported")  # a side effect: proof of import


def build(cfg, num_classes, input_shape):
    raise RuntimeError("no such layer\\nsecond line")


def loader(cfg):
    raise KeyError("x_train")


def loader_none(cfg):
    return None


def loader_text_classes(cfg):
    x = np.zeros((40, 3), np.float32)
    return x, np.arange(40) % 2, x[:10], np.arange(10) % 2


loader_text_classes.num_classes = "2"


def nan_scores(params, signals):
    return {k: {n: np.full(np.shape(v), np.nan) for n, v in layer.items()} for k, layer in params.items()}


def partial_scores(params, signals):
    first = next(iter(params))
    return {first: {n: np.abs(v) for n, v in params[first].items()}}
'''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """A fresh user module (its import leaves ``<module>.imported`` beside it); returns (name, marker)."""
    name = f"storesec_user_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name, tmp_path / f"{name}.imported"


def test_eval_export_never_imports_the_data_set_its_header_names(stored, tmp_path, user_code):
    import struct
    from lth.quant import export_level
    from lth.quant.export import DIGEST_BYTES, MAGIC, ExportError, eval_export
    mod, marker = user_code
    cfg, ref = stored
    path = tmp_path / "t.lthq"
    export_level(ref / cfg.run_id, 1, 8, path)
    before = eval_export(path)  # the header names mnist1d, a built-in data set
    blob = path.read_bytes()
    (hlen,) = struct.unpack("<I", blob[8:12])
    header = json.loads(blob[12:12 + hlen])
    header["info"]["data"]["name"] = f"{mod}:loader"  # a crafted file, its checksum recomputed
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + blob[12 + hlen:-DIGEST_BYTES]
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(ExportError, match=rf"t.lthq \(header\): data.name = '{mod}:loader' is not a built-in data "
                                          rf"set, and lth imports no code named inside a file.*--data {mod}:loader"):
        eval_export(path)
    assert not marker.exists()
    r = eval_export(path, data="mnist1d")  # the user names the data set on the command line
    assert r["accuracy"] == before["accuracy"] and r["n"] == before["n"] and not marker.exists()


def test_a_stored_run_never_imports_the_model_it_names_unless_the_user_trusts_it(stored, tmp_path, user_code):
    from lth import registry
    from lth.config import ConfigError, stored_run_id
    from lth.stored import StoredRun
    mod, marker = user_code
    run = _copy(stored, tmp_path)
    h = json.loads((run / "hparams.json").read_text())
    h["model"]["name"] = f"{mod}:build"
    h["run_id"] = stored_run_id(h, "hparams.json")  # a crafted store whose hparams hash to its folder
    (run / "hparams.json").write_text(json.dumps(h))
    run = run.rename(run.parent / h["run_id"])
    with pytest.raises(ConfigError, match=rf"hparams.json: model.name = '{mod}:build' is not a built-in model, and "
                                          rf"lth imports no code named inside a file.*--code {mod}:build"):
        StoredRun.open(run)
    assert not marker.exists()
    registry.trust(f"{mod}:build")  # lth quantize RUN --code MOD:build
    try:
        with pytest.raises(ValueError, match=rf"model '{mod}:build' failed: RuntimeError: no such layer$"):
            StoredRun.open(run)
        assert marker.exists()
    finally:
        registry.TRUSTED.discard(f"{mod}:build")


@pytest.mark.parametrize("key, value, message", [
    ("model.name", "builtins:input", r"'builtins' is Python's own"),
    ("data.name", "os:system", r"'os' is Python's own"),
    ("prune.criterion", "json.decoder:JSONDecoder", r"'json.decoder' is Python's own"),
])
def test_settings_accept_only_user_functions_and_classes_and_import_nothing(user_code, key, value, message):
    from lth.config import ConfigError, ExperimentConfig
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=f"{key} = '{value}': .*{message}"):
        ExperimentConfig.from_dict({section: {field: value}})
    mod, marker = user_code
    ExperimentConfig.from_dict({"model": {"name": f"{mod}:build"}, "data": {"name": f"{mod}:loader"},
                                "prune": {"criterion": f"{mod}:nan_scores"}})  # as lth sweep --dry-run does
    assert not marker.exists()  # checked, not imported: user code runs when work starts


def test_user_code_failures_are_one_line_errors_naming_the_callable(user_code):
    from lth.config import DataConfig, ModelConfig, PruneConfig
    from lth.data import DataError, load_dataset
    from lth.models import build_model
    from lth.prune.criteria import Signals, scores
    mod, _ = user_code
    for loader, message in [("loader", r"data set '{m}:loader' failed: KeyError: 'x_train'"),
                            ("loader_none", r"data set loader '{m}:loader_none' must return \(x_train"),
                            ("loader_text_classes", r"loader '{m}:loader_text_classes': its num_classes attribute "
                                                    r"is '2'; expected an integer >= 1")]:
        with pytest.raises(DataError, match=message.format(m=mod)) as e:
            load_dataset(DataConfig(name=f"{mod}:{loader}", val_size=4))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=rf"model '{mod}:build' failed: RuntimeError: no such layer$"):
        build_model(ModelConfig(name=f"{mod}:build"), 2, (3,))
    params = {"dense_0": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)},
              "dense_1": {"kernel": np.ones((2, 2), np.float32)}}
    for crit, message in [("nan_scores", r"criterion '{m}:nan_scores' gave NaN scores for \['dense_0'\]\['bias'\] "
                                         r"\(seed 0, level 1\): NaN scores would prune arbitrarily"),
                          ("partial_scores", r"criterion '{m}:partial_scores' returned dict without scores for "
                                             r"\['dense_1'\]\['kernel'\]")]:
        sig = Signals(None, params, {}, 0, 1, PruneConfig(criterion=f"{mod}:{crit}"), lambda: [])
        with pytest.raises(ValueError, match=message.format(m=mod)):
            scores(params, sig)


def test_a_quant_marker_with_malformed_seeds_makes_its_cell_pending_not_a_traceback(tmp_path):
    import pandas as pd
    from lth.quant.stage import cell_problem
    from lth.store import parquet_bytes
    q = tmp_path / "level_001" / "quant"
    q.mkdir(parents=True)
    data = parquet_bytes(pd.DataFrame({"seed": [0]}))
    (q / "abc.parquet").write_bytes(data)
    (q / "abc.json").write_text(json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "seeds": ["zero"]}))
    problem = cell_problem(tmp_path / "level_001", "abc", seeds=[0])
    assert problem is not None and "abc.json: its seeds ['zero'] are not integers" in problem

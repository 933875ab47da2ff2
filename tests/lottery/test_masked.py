"""`lth train --mask`: training a given mask from each seed's init, validation, identity, determinism."""

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from analysis import load_runs
from lth.cli import main
from lth.config import ExperimentConfig
from lth.lottery import run_lottery
from lth.store import load_tree, tree_bytes
from lth.train import unstack

from helpers import toml_text

# A tiny IMP run (2 levels, ticket + random_prune) whose stored masks the tests train again.
TINY = {
    "name": "tiny_masked", "seeds": [0, 1], "arms": ["ticket", "random_prune"],
    "data": {"name": "mnist1d", "mnist1d_samples": 1000, "val_size": 100},
    "model": {"name": "mlp", "widths": [24, 16]},
    "train": {"optimizer": "adam", "lr": 3e-3, "batch_size": 50, "steps": 40, "eval_every": 20},
    "prune": {"levels": 2, "rate": 0.3, "output_rate": 0.15},
    "log": {"wandb": "disabled", "progress": False},
}


@pytest.fixture(scope="module")
def lottery(tmp_path_factory):
    """(experiment file, lottery store) of the tiny IMP run."""
    root = tmp_path_factory.mktemp("masked")
    exp = root / "tiny.toml"
    exp.write_text(toml_text(TINY))
    store = run_lottery(ExperimentConfig.from_dict(TINY), root / "lottery")
    return exp, store


def train(exp, out, *extra):
    return main(["train", str(exp), "--out", str(out), "--no-progress", *extra])


def the_run(out: Path) -> Path:
    (run,) = [p.parent for p in Path(out).glob("*/hparams.json")]
    return run


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def masked(lottery, tmp_path_factory):
    """`lth train --mask level_002` of the tiny run: (lottery store, run folder of the masked run)."""
    exp, store = lottery
    out = tmp_path_factory.mktemp("masked_out")
    assert train(exp, out, "--mask", str(store.level_dir(2))) == 0
    return store, the_run(out)


def test_ticket_mask_trains_from_the_seed_init_and_pruned_weights_stay_zero(masked):
    store, run = masked
    ticket_masks = load_tree(store.level_dir(2) / "masks.msgpack")
    members = json.loads((store.level_dir(2) / "members.json").read_text())
    masks = load_tree(run / "level_000" / "masks.msgpack")
    final = load_tree(run / "level_000" / "final.msgpack")
    init = load_tree(run / "init.msgpack")
    # the same init as the lottery run (the dense network of each seed)
    for a, b in zip(leaves(init), leaves(store.read_tree("init.msgpack"))):
        np.testing.assert_array_equal(a, b)
    for k, seed in enumerate(TINY["seeds"]):
        i = members.index({"arm": "ticket", "seed": seed})
        for m, t in zip(leaves(unstack(masks, k)), leaves(unstack(ticket_masks, i))):
            np.testing.assert_array_equal(m, t)
        n_pruned = 0
        for w, m in zip(leaves(unstack(final["params"], k)), leaves(unstack(masks, k))):
            assert (w[~m] == 0.0).all() and not np.signbit(w[~m]).any()  # exactly +0.0
            n_pruned += int((~m).sum())
        assert n_pruned > 0
    # with rewind step 0 the masked run is the IMP level's ticket again (same init, mask, batches)
    lottery_final = load_tree(store.level_dir(2) / "final.msgpack")
    for k, seed in enumerate(TINY["seeds"]):
        i = members.index({"arm": "ticket", "seed": seed})
        for a, b in zip(leaves(unstack(final["params"], k)), leaves(unstack(lottery_final["params"], i))):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_run_id_hparams_and_metrics_record_the_mask(masked):
    store, run = masked
    hp = json.loads((run / "hparams.json").read_text())
    dense = ExperimentConfig.from_dict({**TINY, "prune": {**TINY["prune"], "levels": 0}})
    assert hp["run_id"] == run.name and run.name not in (dense.run_id, store.run_id)
    f = store.level_dir(2) / "masks.msgpack"
    assert hp["mask"]["file"] == str(f.resolve())
    assert hp["mask"]["source"] == str(store.level_dir(2))
    assert hp["mask"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert hp["mask"]["arm"] == "ticket" and hp["mask"]["source_seeds"] == [0, 1]
    df = load_runs(run.parent)
    lot = load_runs(store.root)
    want = lot[(lot["level"] == 2) & (lot["arm"] == "ticket")]["density"].unique()
    assert df["density"].unique().tolist() == want.tolist() and want[0] < 0.6
    assert set(df["arm"]) == {"ticket"} and sorted(df["seed"].unique()) == [0, 1]
    assert df["mask.sha256"].unique().tolist() == [hp["mask"]["sha256"]]
    assert (df["mask_seed"] == df["seed"]).all()
    # the run folder reads like any other: its config loads, `lth sparsity` reports it
    from lth.stored import run_config
    assert run_config(run)[0].model.widths == (24, 16)
    assert main(["sparsity", str(run)]) == 0


def test_same_seed_gives_identical_metrics_twice_and_a_rerun_trains_nothing(lottery, masked, tmp_path):
    exp, store = lottery
    _, run = masked
    assert train(exp, tmp_path, "--mask", str(store.level_dir(2) / "masks.msgpack")) == 0
    again = the_run(tmp_path)
    assert again.name == run.name  # the folder and its masks.msgpack are the same mask
    cols = ["seed", "step", "split", "loss", "accuracy", "density", "early_stop_step"]
    a = pd.read_parquet(run / "level_000" / "metrics.parquet")[cols]
    b = pd.read_parquet(again / "level_000" / "metrics.parquet")[cols]
    pd.testing.assert_frame_equal(a, b)
    stamp = (again / "level_000" / "metrics.parquet").stat().st_mtime_ns
    assert train(exp, tmp_path, "--mask", str(store.level_dir(2))) == 0
    assert (again / "level_000" / "metrics.parquet").stat().st_mtime_ns == stamp


def test_mask_arm_picks_that_arms_masks(lottery, tmp_path):
    exp, store = lottery
    assert train(exp, tmp_path, "--mask", str(store.level_dir(1)), "--mask-arm", "random_prune",
                 "--set", "train.steps=20") == 0
    run = the_run(tmp_path)
    members = json.loads((store.level_dir(1) / "members.json").read_text())
    src = load_tree(store.level_dir(1) / "masks.msgpack")
    got = load_tree(run / "level_000" / "masks.msgpack")
    for k, seed in enumerate(TINY["seeds"]):
        i = members.index({"arm": "random_prune", "seed": seed})
        for m, t in zip(leaves(unstack(got, k)), leaves(unstack(src, i))):
            np.testing.assert_array_equal(m, t)
    assert set(pd.read_parquet(run / "level_000" / "metrics.parquet")["arm"]) == {"random_prune"}


def test_a_single_mask_is_shared_by_every_seed(lottery, tmp_path):
    exp, store = lottery
    one = unstack(load_tree(store.level_dir(1) / "masks.msgpack"), 1)  # ticket of seed 1, unstacked
    f = tmp_path / "one.msgpack"
    f.write_bytes(tree_bytes(one))
    out = tmp_path / "out"
    assert train(exp, out, "--mask", str(f), "--set", "train.steps=20") == 0
    run = the_run(out)
    got = load_tree(run / "level_000" / "masks.msgpack")
    for k in range(2):
        for m, t in zip(leaves(unstack(got, k)), leaves(one)):
            np.testing.assert_array_equal(m, t)
    assert json.loads((run / "hparams.json").read_text())["mask"]["source_seeds"] == [-1, -1]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lth: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", ["shape", "layer", "seed", "arm", "stacked", "values", "garbage"])
def test_unusable_mask_is_one_line_exit_2_and_writes_nothing(lottery, tmp_path, capsys, case):
    exp, store = lottery
    level = store.level_dir(1)
    mask, extra, fragments = str(level), [], []
    masks = load_tree(level / "masks.msgpack")
    if case == "shape":  # the model's second hidden layer is wider than the mask's
        extra = ["--set", "model.widths=[24, 17]"]
        fragments = ["masks.msgpack", "dense_1/kernel", "24x16", "24x17"]
    elif case == "layer":  # a mask for a deeper model
        extra = ["--set", "model.widths=[24, 16, 8]"]
        fragments = ["masks.msgpack", "mask has no layer dense_2/kernel"]
    elif case == "seed":  # the level holds masks of seeds 0 and 1 only
        extra = ["--set", "seeds=[0, 2]"]
        fragments = ["masks.msgpack", "seed 2", "--set seeds=[0,1]"]
    elif case == "arm":
        extra = ["--mask-arm", "shuffle"]
        fragments = ["members.json", "'shuffle'", "random_prune, ticket"]
    elif case == "stacked":  # several masks, no members.json to say whose
        f = tmp_path / "stacked.msgpack"
        f.write_bytes(tree_bytes(masks))
        mask, fragments = str(f), ["stacked.msgpack", "members.json"]
    elif case == "values":  # a weights file is not a mask
        f = tmp_path / "weights.msgpack"
        f.write_bytes(tree_bytes(unstack(load_tree(level / "final.msgpack")["params"], 0)))
        mask, fragments = str(f), ["weights.msgpack", "other than 0 and 1"]
    elif case == "garbage":
        f = tmp_path / "garbage.msgpack"
        f.write_bytes(b"\x00not msgpack")
        mask, fragments = str(f), ["garbage.msgpack"]
    out = tmp_path / "out"
    assert train(exp, out, "--mask", mask, *extra) == 2
    line = _one_line_error(capsys)
    for frag in fragments:
        assert frag in line, line
    assert not out.exists()


def test_mask_arm_without_mask_and_missing_mask(lottery, tmp_path, capsys):
    exp, _ = lottery
    assert train(exp, tmp_path / "o", "--mask-arm", "ticket") == 2
    assert "--mask-arm needs --mask" in _one_line_error(capsys)
    assert train(exp, tmp_path / "o", "--mask", str(tmp_path / "nope")) == 2
    assert "no such file or folder" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()

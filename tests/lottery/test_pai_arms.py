"""Pruning-at-init arms: the ticket's exact overall count (each method's own per-layer counts), the ticket's
start weights, their criterion's mask; the early-bird table of the dense level; an end-to-end run through the CLI and `lth report`."""

import dataclasses

import jax
import numpy as np
import pandas as pd
import pytest

from helpers import TINY, tiny, toml_text
from lth.cli import main
from lth.config import ConfigError, describe_fields
from lth.data import load_dataset
from lth.lottery.arms import ARMS
from lth.lottery.runner import Lottery
from lth.prune.criteria import CRITERIA
from lth.prune.masks import keep_global, magnitude_prune
from lth.store import load_tree
from lth.train import unstack

PAI = ["snip", "grasp", "synflow", "snip_shuffle", "grasp_shuffle", "synflow_shuffle"]


@pytest.fixture(scope="module")
def pai_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pai")
    cfg = tiny(seeds=[0, 1], arms=["ticket", "random_prune", *PAI], prune={"levels": 2},
               train={"steps": 40, "eval_every": 20})
    Lottery(cfg, out, progress=False).run()
    return cfg, out / cfg.run_id


def _counts(tree):
    return [int(np.sum(x)) for x in jax.tree.leaves(tree)]


def test_every_pai_arm_keeps_the_tickets_exact_overall_count(pai_run):
    cfg, run = pai_run
    for level in (1, 2):
        members = pd.read_json(run / f"level_00{level}" / "members.json")
        masks = load_tree(run / f"level_00{level}" / "masks.msgpack")
        for seed in cfg.seeds:
            k_ticket = members.index[(members.arm == "ticket") & (members.seed == seed)][0]
            ticket = unstack(masks, k_ticket)
            seen = []
            for arm in PAI:
                k = members.index[(members.arm == arm) & (members.seed == seed)][0]
                mask = unstack(masks, k)
                assert sum(_counts(mask)) == sum(_counts(ticket)), (level, seed, arm)  # biases: all kept in both
                assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(ticket)))
                seen.append(mask)
            for plain, shuffled in zip(seen[:3], seen[3:]):  # the shuffle ablation moves the mask, within layers
                assert _counts(plain) == _counts(shuffled)
                assert not np.array_equal(plain["dense_0"]["kernel"], shuffled["dense_0"]["kernel"])


def test_pai_arms_start_from_the_tickets_weights_with_their_criterions_mask(pai_run):
    cfg, run = pai_run
    lot = Lottery(cfg, run.parent, progress=False)
    init = lot.init_weights()
    plan = lot.prepare_level(2, init)
    ticket = {m.seed: k for k, m in enumerate(plan.members) if m.arm == "ticket"}
    for k, m in enumerate(plan.members):
        if m.arm not in PAI:
            continue
        start = plan.weights[k]  # rewind.step = 0: the init of the seed
        for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(unstack(init["params"], cfg.seeds.index(m.seed)))):
            np.testing.assert_array_equal(a, b)
        if m.arm in ("snip", "grasp"):  # prune.pai_allocation = "global": one top-k over the prunable weights
            total = sum(int(np.sum(x)) for x, p in zip(jax.tree.leaves(plan.masks[ticket[m.seed]]),
                                                       jax.tree.leaves(plan.can_prune)) if p)
            sig = dataclasses.replace(lot.signals(start, m.seed, 2), can_prune=plan.can_prune)
            want = keep_global(CRITERIA[m.arm](start["params"], sig), plan.can_prune, total)
            for a, b in zip(jax.tree.leaves(plan.masks[k]), jax.tree.leaves(want)):
                np.testing.assert_array_equal(a, b)


def test_dense_level_records_early_bird_distances(pai_run):
    cfg, run = pai_run
    eb = pd.read_parquet(run / "level_000" / "earlybird.parquet")
    spe = len(load_dataset(cfg.data).x_train) // cfg.train.batch_size
    assert sorted(eb["step"].unique()) == sorted({*range(spe, 41, spe), 40})
    assert set(eb["layer"]) == {"dense_0/kernel", "dense_1/kernel", "output/kernel", "all"}
    assert eb["distance"].between(0, 1).all() and (eb["distance"] > 0).any()
    assert sorted(eb["seed"].unique()) == [0, 1]


def test_earlybird_observer_distance_by_hand():
    from lth.lottery.earlybird import EarlyBird, mask_distance

    a = {"k": np.array([[1, 1, 0, 0]], bool), "b": np.ones(2, bool)}
    b = {"k": np.array([[1, 0, 1, 0]], bool), "b": np.zeros(2, bool)}
    assert mask_distance(a, b, {"k": True, "b": False}) == {"k": 0.5, "all": 0.5}
    cfg = tiny(prune={"rate": 0.5, "output_rate": 0.5})
    w0 = {"params": {"output": {"kernel": np.array([[[4.0, 3.0, 2.0, 1.0]]])}}}  # [K=1, 1, 4]
    w1 = {"params": {"output": {"kernel": np.array([[[1.0, 3.0, 2.0, 4.0]]])}}}
    bird = EarlyBird(cfg, {"output": {"kernel": True}}, [7], [0], spe=5)
    bird(0, w0)
    bird(5, w1)  # masks [1 1 0 0] -> [0 1 0 1]: 2 of 4 differ
    t = bird.table()
    assert t.to_dict("records") == [
        {"seed": 7, "epoch": 1, "step": 5, "layer": "output/kernel", "distance": 0.5},
        {"seed": 7, "epoch": 1, "step": 5, "layer": "all", "distance": 0.5}]
    ones = {"output": {"kernel": np.ones((1, 4), bool)}}
    assert magnitude_prune(w1["params"] | {}, ones, cfg.prune)["output"]["kernel"].tolist() == [[False, True, False, True]]


def test_pai_arms_are_settings_and_registry_entries():
    assert set(PAI) <= set(ARMS)
    text = describe_fields()
    assert "synflow_rounds" in text and "snip_shuffle" in text
    with pytest.raises(ConfigError, match="synflow_shuffle"):
        tiny(arms=["ticket", "snipp"])


def test_lottery_with_pai_arms_and_report_through_the_cli(tmp_path, capsys):
    raw = {**TINY, "seeds": [0, 1], "arms": ["ticket", "random_prune", "synflow", "snip_shuffle"],
           "prune": {**TINY["prune"], "levels": 2, "synflow_rounds": 10}}
    exp = tmp_path / "exp.toml"
    exp.write_text(toml_text(raw))
    assert main(["lottery", str(exp), "--out", str(tmp_path / "runs")]) == 0
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "figs")]) == 0
    figs = tmp_path / "figs"
    for stem in ("pai_accuracy_vs_density", "mask_overlap_seeds", "mask_overlap_vs_density",
                 "earlybird_distance"):
        assert (figs / f"{stem}.png").is_file() and (figs / f"{stem}.pdf").is_file(), stem
    ticket = pd.read_csv(figs / "mask_ticket.csv")
    assert {"jaccard_oneshot_init", "jaccard_oneshot_trained", "sign_flip"} <= set(ticket.columns)
    summary = pd.read_csv(figs / "summary.csv")
    assert {"synflow", "snip_shuffle"} <= set(summary["arm"])
    assert "pai_accuracy_vs_density" in (figs / "README.md").read_text()


def test_with_late_rewinding_pai_arms_start_from_the_rewind_point(tmp_path):
    cfg = tiny(seeds=[0], arms=["ticket", "snip", "synflow_shuffle"], prune={"levels": 1, "synflow_rounds": 5},
               rewind={"step": 10}, train={"steps": 20, "eval_every": 20})
    lot = Lottery(cfg, tmp_path, progress=False)
    lot.run()
    rewind = lot.store.read_tree("rewind.msgpack")
    plan = lot.prepare_level(1, lot.init_weights())
    for w in plan.weights:  # every arm, the ticket included, starts from the step-10 weights
        for a, b in zip(jax.tree.leaves(w["params"]), jax.tree.leaves(unstack(rewind["params"], 0))):
            np.testing.assert_array_equal(a, b)
    counts = [sum(_counts(m)) for m in plan.masks]
    assert counts[0] == counts[1] == counts[2]

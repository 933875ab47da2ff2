"""A level whose population holds IMP, sparse-from-scratch (RigL) and one-shot (wanda_ft) arms at once:
it runs, each arm is at its own density, and each member equals the one its arm trains alone."""

import jax
import numpy as np
import pandas as pd

from helpers import tiny
from lth.lottery.runner import Lottery
from lth.store import load_tree
from lth.train import unstack

SMALL = {"seeds": [0], "train": {"steps": 20, "eval_every": 10},
         "prune": {"levels": 1, "rate": 0.5, "calib_batches": 1, "oneshot_finetune_steps": 5, "dst_delta_t": 5}}
KERNELS = ("dense_0", "dense_1", "output")


def _member(run_dir, arm):
    d = run_dir / "level_001"
    members = pd.read_json(d / "members.json")
    k = int(members.index[members.arm == arm][0])
    return unstack(load_tree(d / "masks.msgpack"), k), unstack(load_tree(d / "final.msgpack")["params"], k)


def _density(mask):
    kept = sum(int(mask[layer]["kernel"].sum()) for layer in KERNELS)
    return kept / sum(mask[layer]["kernel"].size for layer in KERNELS)


def test_ticket_rigl_and_wanda_ft_in_one_population_equal_each_arm_alone(tmp_path):
    together = tiny(**SMALL, arms=["ticket", "rigl", "wanda_ft"])
    Lottery(together, tmp_path / "together", progress=False).run()
    run = tmp_path / "together" / together.run_id
    regrown = pd.read_parquet(run / "level_001" / "dst.parquet")  # rigl's regrowth table is stored beside them
    assert set(regrown.arm) == {"rigl"} and sorted(set(regrown.step)) == [5, 10] and regrown.regrown.sum() > 0
    ticket, _ = _member(run, "ticket")
    d = _density(ticket)
    assert 0.4 < d < 0.6
    for arm in ("rigl", "wanda_ft"):
        mask, params = _member(run, arm)
        # rigl: the ticket's overall density (ERK per layer); wanda_ft: the ticket's per-layer counts, kept per row
        assert abs(_density(mask) - d) <= 1.5 / min(m["kernel"].shape[0] for m in ticket.values()), arm
        if arm == "wanda_ft":
            for layer in KERNELS:
                rows = mask[layer]["kernel"].sum(0)
                assert rows.min() == rows.max(), layer  # every output row keeps round(density * in)
        else:
            assert not all(np.array_equal(mask[k]["kernel"], ticket[k]["kernel"]) for k in KERNELS)
        assert all(np.all(params[k]["kernel"][~mask[k]["kernel"]] == 0) for k in KERNELS), arm
        alone = tiny(**SMALL, arms=["ticket", arm])
        assert alone.run_id == together.run_id  # arms are not part of the run id: separate stores
        Lottery(alone, tmp_path / arm, progress=False).run()
        for a in ("ticket", arm):
            (m1, p1), (m2, p2) = _member(run, a), _member(tmp_path / arm / alone.run_id, a)
            assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(m1), jax.tree.leaves(m2))), a
            for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
                np.testing.assert_allclose(x, y, atol=1e-5, err_msg=a)

"""The accelerator code path, run on the CPU: a population vmapped whole (``train.member_batch = K``,
what a GPU does by default) stores the results of one member at a time (the CPU default), to float
rounding, through every stage that runs a population: training an MLP and a conv net with batch norm,
the stability path, the quant stage (PTQ, QAT and whatever else its cells hold) and a run that grows; and the same with the population
sharded over 2 host devices (a subprocess: the device count is fixed before jax starts).

``benchmarks/gpu.sh`` runs this file on a GPU machine, where the same comparison checks the GPU's
kernels against each other.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from lth.models import POOL, VGG, register
from lth.pipeline import run_experiment
from lth.store import load_tree

from helpers import tiny

ALL = 1 << 20  # member_batch at least any population here: every population is vmapped whole
# what float rounding may move: vmapped matmuls and reductions sum in another order than unbatched ones
RTOL, ATOL = 1e-4, 1e-5
FAST = {"steps": 6, "eval_every": 3}
STAGES = {"stability": {"enabled": True, "points": 3, "levels": [1], "bn_batches": 2},
          "quant": {"bits": [4], "method": ["ptq", "qat"], "qat_steps": 2, "levels": [1], "calib_batches": 2}}


def tiny_bn_convnet(cfg, num_classes, input_shape):
    """conv(4)-BN-ReLU, pool, conv(8)-BN-ReLU, global average pool, output: a VGG of two convs."""
    return VGG((4, POOL, 8), num_classes, cfg.init)


if "accel_bn_convnet" not in __import__("lth.registry").registry.MODELS.entries:
    register("accel_bn_convnet")(tiny_bn_convnet)


def mlp_configs(member_batch) -> list:
    """A run of one member per level, then grown by a seed and an arm: stability copies and quant cells
    of level 1 in both (the grow adds members, copies and cells to the stored ones)."""
    train = {**FAST, "member_batch": member_batch}
    return [tiny(prune={"levels": 1}, seeds=[0], arms=["ticket"], train=train, **STAGES),
            tiny(prune={"levels": 1}, seeds=[0, 1], arms=["ticket", "random_prune"], train=train, **STAGES)]


def bn_config(member_batch):
    stages = {**STAGES, "quant": {**STAGES["quant"], "method": ["ptq"]}}  # QAT: the MLP's test
    return tiny(data={"name": "mnist", "val_size": 10}, model={"name": "accel_bn_convnet", "widths": [300, 100]},
                prune={"levels": 1}, arms=["ticket", "reinit"],
                train={**FAST, "batch_size": 10, "member_batch": member_batch}, **stages)


def run_dir(out: Path) -> Path:
    return next(out.glob("*/hparams.json")).parent


def assert_same_results(a: Path, b: Path) -> None:
    """Every stored file of run folder ``b`` holds ``a``'s numbers to float rounding (weights, masks,
    metrics, stability paths, quant cells; wall times and checksums aside)."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix in (".msgpack", ".parquet"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.suffix in (".msgpack", ".parquet"))
    for rel in files:
        if rel.suffix == ".msgpack":
            ta, tb = load_tree(a / rel), load_tree(b / rel)
            assert jax.tree.structure(ta) == jax.tree.structure(tb), rel
            for x, y in zip(jax.tree.leaves(ta), jax.tree.leaves(tb)):
                if np.asarray(x).dtype == bool:
                    np.testing.assert_array_equal(x, y, err_msg=str(rel))  # masks: exactly
                else:
                    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                               rtol=RTOL, atol=ATOL, err_msg=str(rel))
            continue
        da, db = pd.read_parquet(a / rel), pd.read_parquet(b / rel)
        assert list(da.columns) == list(db.columns) and len(da) == len(db), rel
        for c in da.columns:
            if "wall" in c:
                continue
            if pd.api.types.is_float_dtype(da[c]):
                np.testing.assert_allclose(da[c].to_numpy(), db[c].to_numpy(), rtol=RTOL, atol=ATOL,
                                           err_msg=f"{rel}: {c}")
            else:
                assert da[c].tolist() == db[c].tolist(), f"{rel}: {c}"
    for (x, y) in ((a, b), (b, a)):  # every member, stability path and quant cell is there in both
        for d in ("members.json", "stability", "quant"):
            assert sorted(p.name for p in x.rglob(d)) == sorted(p.name for p in y.rglob(d))


def run_mlp(member_batch, out: Path) -> None:
    for cfg in mlp_configs(member_batch):
        run_experiment(cfg, out, progress=False)


@pytest.fixture(scope="module")
def mlp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel")
    for mb, name in ((1, "one"), (ALL, "all")):
        run_mlp(mb, root / name)
    return root


def test_vmapped_mlp_population_its_stability_quant_and_grow_equal_member_at_a_time(mlp_runs):
    a, b = run_dir(mlp_runs / "one"), run_dir(mlp_runs / "all")
    assert_same_results(a, b)
    assert len(json.loads((a / "level_001" / "members.json").read_text())) == 8  # 2 arms x 2 seeds, each with a copy
    paths = pd.concat([pd.read_parquet(p) for p in a.glob("level_001/stability/*.parquet")])
    assert len(paths[["arm", "seed", "point"]].drop_duplicates()) == 4 * 3  # 4 paths of 3 points
    q = pd.concat([pd.read_parquet(p) for p in a.glob("level_001/quant/*.parquet")])
    # ptq and qat (and QAT's float_ft control where the stage writes one) of 2 arms x 2 seeds
    assert {"ptq", "qat"} <= set(q.method) and len(q[q.method.isin(["ptq", "qat"])]) == 2 * 2 * 2


def test_vmapped_conv_net_with_batch_norm_equals_member_at_a_time(tmp_path, monkeypatch):
    from lth.data import load_dataset
    from test_data import tiny_idx_set
    monkeypatch.setenv("LTH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LTH_CACHE_DIR", str(tmp_path / "cache"))
    load_dataset.cache_clear()
    tiny_idx_set(tmp_path / "data" / "mnist", n_train=60, n_test=10, hw=(8, 8))
    try:
        for mb, name in ((1, "one"), (ALL, "all")):
            run_experiment(bn_config(mb), tmp_path / name, progress=False)
    finally:
        load_dataset.cache_clear()
    a, b = run_dir(tmp_path / "one"), run_dir(tmp_path / "all")
    assert "batch_stats" in load_tree(a / "level_001" / "final.msgpack")
    assert_same_results(a, b)


SHARDED = """
import sys
sys.path.insert(0, {tests!r})
import jax
from pathlib import Path
from test_accelerator_path import ALL, run_mlp
assert jax.local_device_count() == 2, jax.devices()
from lth.train import population_sharding
assert len(population_sharding(4).device_set) == 2
run_mlp(ALL, Path({out!r}))
"""


def test_vmapped_population_sharded_over_two_devices_equals_member_at_a_time_on_one(mlp_runs, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LTH_CPU_DEVICES": "1",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"}
    code = SHARDED.format(tests=str(Path(__file__).parent), out=str(tmp_path / "two"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_results(run_dir(mlp_runs / "one"), run_dir(tmp_path / "two"))

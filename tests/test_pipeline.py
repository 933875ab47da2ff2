"""One experiment, whole pipeline: the quant stage inside lottery and sweep, keyed apart from training."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import load_quant, load_runs
from lth.config import ConfigError, ExperimentConfig
from lth.pipeline import run_experiment, run_status
from lth.quant import read_cells
from lth.quant.stage import quant_levels
from lth.sweep import expand, groups_of, status_of
from helpers import TINY, toml_text

ROOT = Path(__file__).resolve().parents[1]
QUANT = {"bits": [8, 2], "method": ["ptq", "qat"], "qat_steps": 4, "levels": [0, 1]}
EXP = {**TINY, "arms": ["ticket", "random_prune", "small_dense"], "prune": {**TINY["prune"], "levels": 1},
       "quant": QUANT}
KEYS = ["level", "arm", "seed", "bits", "method"]


def _cfg(raw=EXP, **quant):
    return ExperimentConfig.from_dict({**raw, "quant": {**raw["quant"], **quant}})


def _table(out) -> pd.DataFrame:
    q = load_quant(out).drop(columns=["wall_s", "experiment"])
    return q.sort_values(KEYS, ignore_index=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_experiment(_cfg(), out)
    return out


def test_quant_settings_are_not_part_of_the_run_id_and_are_checked_against_the_run():
    plain = ExperimentConfig.from_dict({k: v for k, v in EXP.items() if k != "quant"})
    assert _cfg().run_id == plain.run_id == _cfg(bits=[4]).run_id
    assert _cfg().quant.bits == (8, 2) and plain.quant is None
    with pytest.raises(ConfigError, match=r"quant.arms = \['reinit'\].*its arms: ticket, random_prune, small_dense"):
        _cfg(arms=["reinit"])
    with pytest.raises(ConfigError, match=r"quant.levels = \[5\] names no level of the run \(prune.levels = 1\)"):
        _cfg(levels=[5])
    assert quant_levels(_cfg(levels=[1, 5]), _cfg(levels=[1, 5]).quant) == [1]  # past the end: skipped
    with pytest.raises(ConfigError, match=r"quant.bits = \[5\]"):
        _cfg(bits=[5])


def test_every_arm_and_seed_of_the_chosen_levels_is_quantized(reference):
    cfg = _cfg()
    q = _table(reference)
    # level 0: the dense network (ticket arm); level 1: ticket, random_prune and small_dense; 2 seeds each;
    # 2 bits x 2 methods, and QAT's float control (float_ft) of each member
    assert len(q) == (1 + 3) * 2 * 5 and len(q[q.method == "float_ft"]) == len(q[q.method == "qat"]) // 2
    assert set(q[q.level == 1].arm) == {"ticket", "random_prune", "small_dense"}
    assert set(q[q.level == 0].arm) == {"ticket"}
    assert (q.run_id == cfg.run_id).all() and q.cell.nunique() == len(q) // 2
    assert (q[q.method != "float_ft"].size_bytes < q[q.method != "float_ft"].fp32_dense_bytes).all()
    sd, ticket = q[q.arm == "small_dense"], q[(q.arm == "ticket") & (q.level == 1)]
    assert (sd.fp32_dense_bytes < ticket.fp32_dense_bytes.max()).all()  # the narrower model
    assert run_status(cfg, reference) == {"levels": 2, "of": 2, "cells": 0, "stability": 0, "new_levels": 0,
                                          "seeds": 0, "arms": 0}
    # the tidy table: float rows (bits 32) and quantized rows with the same keys
    df = load_runs(reference)
    assert set(df.method) == {"float", "ptq", "qat", "float_ft"} and (df[df.method == "float"].bits == 32).all()
    f = df[df.method == "float"]
    dense_bytes = f[f.level == 0].size_bytes.iloc[0]
    assert dense_bytes == f[f.level == 0].param_count.iloc[0] * 4  # the dense float32 network
    assert (f[(f.level == 1) & (f.arm == "ticket")].size_bytes < dense_bytes).all()  # stored sparse
    assert (df[df.method != "float"].diverged_step == -1).all()  # training divergence carried to quant rows
    for col in ("run_id", "arm", "seed", "level", "density", "param_count", "bits", "method", "scheme",
                "granularity", "calibration", "act_bits", "size_bytes", "compression", "diverged_step"):
        assert df[col].notna().all(), col


@pytest.mark.slow
def test_the_experiments_quant_settings_are_recorded_with_the_run_for_lth_quantize(reference):
    from lth.config import QuantConfig
    from lth.stored import stored_quant_settings
    settings, source = stored_quant_settings(reference / _cfg().run_id)
    assert QuantConfig.from_dict(settings) == _cfg().quant and source == f"experiment {_cfg().name!r}"


def test_changing_only_quant_settings_trains_nothing_and_computes_only_new_cells(reference, tmp_path):
    import shutil
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    run = out / _cfg().run_id
    trained = {p: p.stat().st_mtime_ns for p in run.rglob("*")
               if p.is_file() and "quant" not in p.parts
               and p.name not in (".lock", "hparams.json", "quant_settings.json")}  # the new [quant] is recorded
    assert any(p.name == "final.msgpack" for p in trained)
    hparams = (run / "hparams.json").read_text()
    before = _table(out)
    exp = tmp_path / "exp.toml"
    exp.write_text(toml_text({**EXP, "quant": {**QUANT, "bits": [8, 4, 2]}, "sweep": {"quant.method": [["ptq"], ["qat"]]}}))
    points = expand(exp)
    assert len(points) == 2 and len({p.run_id for p in points}) == 1 and len(groups_of(points)) == 1
    assert [s for _, s in status_of(points, out)] == ["quantize only (4 cells)", "quantize only (4 cells)"]
    r = subprocess.run([sys.executable, "-m", "lth.cli", "sweep", str(exp), "--out", str(out), "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "quantized 2" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in trained} == trained  # no level was retrained or rewritten
    assert (run / "hparams.json").read_text() == hparams
    after = _table(out)
    assert len(after) == len(before) + 16 and set(after[~after.cell.isin(before.cell)].bits) == {4}
    pd.testing.assert_frame_equal(after[after.cell.isin(before.cell)].reset_index(drop=True), before)
    assert [s for _, s in status_of(points, out)] == ["complete", "complete"]


@pytest.mark.slow
def test_sigkill_during_the_quant_stage_then_rerun_equals_uninterrupted(reference, tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(toml_text(EXP))
    out = tmp_path / "out"
    env = {**os.environ, "LTH_FAILPOINT": "quant-cell:1:random_prune"}
    cmd = [sys.executable, "-m", "lth.cli", "lottery", str(exp), "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == -9, r.stderr  # killed between a cell's table and its marker
    run = out / _cfg().run_id
    assert (run / "level_001" / "COMPLETE").exists()
    partial = read_cells(run / "level_001")
    assert 0 < len(partial) < 24
    env.pop("LTH_FAILPOINT")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    pd.testing.assert_frame_equal(_table(out), _table(reference))
    assert not list(out.rglob("*.tmp"))


def test_pruned_weights_stay_zero_through_the_stage(reference):
    from lth.quant import QuantSpec, quantize_member
    from lth.stored import StoredRun

    run = StoredRun.open(reference / _cfg().run_id)
    masks = run.population(1).masks
    assert all((~masks[layer]["kernel"][0]).any() for layer in ("dense_0", "dense_1", "output"))  # pruned ones
    for method in ("ptq", "qat"):
        qt, _ = quantize_member(run, 1, QuantSpec(2, act_bits=8), method=method, qc=_cfg().quant)
        for layer in ("dense_0", "dense_1", "output"):
            w = np.asarray(qt.params[layer]["kernel"])
            assert np.all(w[~masks[layer]["kernel"][0]] == 0.0)


# ---------------------------------------------------------------------------- package structure

def _imports(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """(imported module, names) of every import in a module of ``lth`` (function-level ones too)."""
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if mod.endswith(".__init__"):
        mod = mod[: -len(".__init__")]
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", "") == "TYPE_CHECKING" for n in node.body}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never executed
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == package or target.startswith(package + "."):
                out.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith(package + ".")]
    return out


def _modules():
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (ROOT / "lth").rglob("*.py")}


def test_no_import_circle_in_lth():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for target, names in _imports(path, "lth"):
            for n in names:  # `from .quant import stage` imports the module lth.quant.stage
                if f"{target}.{n}" in mods:
                    deps.add(f"{target}.{n}")
            if target in mods:
                deps.add(target)
        graph[name] = deps - {name}

    def parents(m):  # importing lth.quant.stage runs lth.quant's __init__ first
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts))}

    for m in graph:
        graph[m] |= {p for d in list(graph[m]) for p in parents(d) if p != m and not m.startswith(p + ".")}
    assert {"lth.config", "lth.store", "lth.stored", "lth.prune"} <= graph["lth.quant.stage"]  # the graph sees imports
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{name} imports {target}.{n}" for name, path in _modules().items()
           for target, names in _imports(path, "lth") for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_importing_the_config_imports_no_quantization_code():
    code = "import sys, lth.config; print(sorted(m for m in sys.modules if m.startswith('lth.quant')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout.replace("'", '"')) == [], r.stdout + r.stderr

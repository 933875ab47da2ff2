"""The notebook API: lth.Experiment loads, varies (validated, immutable), runs and reads back one run."""

import subprocess
import sys
from pathlib import Path

import pytest

import lth
from lth.config import ConfigError, load_experiment
from helpers import TINY, toml_text

ROOT = Path(__file__).resolve().parents[1]


def test_set_returns_a_new_validated_experiment():
    exp = lth.Experiment.from_dict(TINY)
    more = exp.set(**{"prune.levels": 5, "train.lr": 0.01}, seeds=[3])
    assert (exp.config.prune.levels, exp.config.train.lr, exp.config.seeds) == (3, 3e-3, (0, 1))  # unchanged
    assert (more.config.prune.levels, more.config.train.lr, more.config.seeds) == (5, 0.01, (3,))
    assert more.run_id != exp.run_id and more.set(**{"prune.levels": 3, "train.lr": 3e-3}, seeds=[0, 1]) == exp
    # None restores the default; quant.* adds the stage without changing the run id
    assert exp.set(**{"prune.rate": None}).config.prune.rate == 0.2
    q = exp.set(**{"quant.bits": [4]})
    assert q.config.quant.bits == (4,) and q.run_id == exp.run_id and q.set(quant=None).config.quant is None
    with pytest.raises(ConfigError, match=r"Experiment.set\(prune.levels=-1\): prune.levels = -1 is not allowed"):
        exp.set(**{"prune.levels": -1})
    with pytest.raises(ConfigError, match="unknown key prune.level "):
        exp.set(**{"prune.level": 2})
    with pytest.raises(ConfigError, match="key 'trian.lr' is not 'setting' or 'section.setting'"):
        exp.set(**{"trian.lr": 0.1})


def test_from_toml_equals_the_cli_loader(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(toml_text(TINY) + "[sweep]\n\"train.lr\" = [0.1, 0.2]\n")
    exp = lth.Experiment.from_toml(path, ["prune.levels=1"])
    assert exp.config == load_experiment(path, ["prune.levels=1"])
    assert exp == lth.Experiment.from_dict(TINY).set(**{"prune.levels": 1})
    assert repr(exp).startswith(f"Experiment('tiny', run_id={exp.run_id}, model=mlp, data=mnist1d, levels=1")


@pytest.mark.slow
def test_run_returns_the_tidy_frame_with_quant_rows_and_the_cli_finds_it_done(tmp_path):
    exp = lth.Experiment.from_dict(TINY).set(**{"prune.levels": 1, "quant.bits": [8], "train.steps": 20},
                                             seeds=[0], arms=["ticket", "reinit"])
    out = tmp_path / "runs"
    before = exp.status(out)  # 8-bit ptq of level 0 ticket, level 1 both arms
    assert (before["levels"], before["of"], before["cells"], before["new_levels"]) == (0, 2, 3, 2)
    df = exp.run(out)
    after = exp.status(out)
    assert (after["levels"], after["of"], after["cells"], after["new_levels"], after["stability"]) == (2, 2, 0, 0, 0)
    assert set(df.run_id) == {exp.run_id}
    flt = df[df.method == "float"]
    assert set(flt.level) == {0, 1} and set(flt.arm) == {"ticket", "reinit"} and set(flt.bits) == {32}
    q = df[df.method == "ptq"]
    assert set(q.bits) == {8} and set(zip(q.level, q.arm)) == {(0, "ticket"), (1, "ticket"), (1, "reinit")}
    # the CLI takes the same path: the same file with the same settings is the same, finished run
    path = tmp_path / "exp.toml"
    path.write_text(toml_text(TINY))
    sets = ["prune.levels=1", "quant.bits=[8]", "train.steps=20", "seeds=[0]", 'arms=["ticket","reinit"]']
    r = subprocess.run([sys.executable, "-m", "lth", "lottery", str(path), "--out", str(out), "--no-progress",
                        *(a for s in sets for a in ("--set", s))],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"run {exp.run_id}:" in r.stdout
    assert "level_002" not in {p.name for p in (out / exp.run_id).iterdir()}


@pytest.mark.slow
def test_a_first_run_in_a_fresh_home_prints_no_warnings(tmp_path):
    """No warning a user must ignore: jax's compile cache (bounded in size by lth) needs filelock,
    which pyproject declares; nothing else warns on a first lottery with a quant stage."""
    import os
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "filelock" for d in deps)
    path = tmp_path / "exp.toml"
    path.write_text(toml_text(TINY))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION", "LTH_COMPILE"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONPATH=str(ROOT))
    env.pop("LTH_CACHE_DIR", None)
    sets = ["prune.levels=1", "quant.bits=[8]", "train.steps=20", "train.eval_every=10",  # 2 points a level
            "seeds=[0]", 'arms=["ticket"]']
    r = subprocess.run([sys.executable, "-m", "lth", "lottery", str(path), "--out", str(tmp_path / "runs"),
                        "--no-progress", *(a for s in sets for a in ("--set", s))],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (home / ".cache" / "lth" / "jax").is_dir()  # the compile cache was on
    assert "warn" not in r.stderr.lower(), r.stderr

"""The command line: help for every option, one-line errors with exit code 2, nothing half-written."""

import subprocess
import sys
from pathlib import Path

import pytest

from lth.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices


def test_help_lists_every_command_and_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in _subcommands():
        assert name in text
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if action.dest in ("help", "data_command"):
                continue
            assert action.help, f"lth {name}: option {action.dest} has no help text"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lth.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=300)


@pytest.mark.parametrize("args, fragment", [
    (["train", "experiments/quickstart.toml", "--set", "prune.rate=1.5"],
     "prune.rate = 1.5 is not allowed; expected a fraction in [0, 1)"),
    (["train", "experiments/quickstart.toml", "--set", "train.lrr=1"], "unknown key train.lrr"),
    (["train", "experiments/quickstart.toml", "--set", "train.steps=-3"], "train.steps = -3"),
    (["train", "experiments/quickstart.toml", "--set", "model.name=conv2"],
     "model conv2 needs image inputs [H, W, C]"),
    (["train", "experiments/nope.toml"], "does not exist"),
    (["lottery", "experiments/quickstart.toml", "--set", "data.name=mnist"], "lth data download mnist"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, fragment):
    out = tmp_path / "out"
    r = run_cli(*args, "--out", str(out), "--no-progress", "--set", "log.wandb=disabled")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("lth: error: ") and "Traceback" not in r.stderr, r.stderr
    # config errors are one line; a missing data set also lists every path tried, one per line
    assert len(lines) == 1 or "data set not found" in lines[0]
    assert fragment in r.stderr
    assert not out.exists() or not any(out.rglob("*.json"))


def test_output_folder_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = run_cli("train", "experiments/quickstart.toml", "--out", str(f), "--set", "log.wandb=disabled")
    assert r.returncode == 2
    assert "exists and is a file" in r.stderr and r.stderr.count("\n") == 1


def test_malformed_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("seeds = [0,\n")
    r = run_cli("lottery", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "not valid TOML" in r.stderr


def test_report_on_a_folder_that_is_not_a_store(tmp_path):
    r = run_cli("report", str(tmp_path), "--out", str(tmp_path / "figs"))
    assert r.returncode == 2 and "not an lth store" in r.stderr


# ---------------------------------------------------------------------------- a finished tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lth.lottery import run_lottery
    from helpers import tiny
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny(prune={"levels": 1}, arms=["ticket"], seeds=[0])
    run_lottery(cfg, out)
    return cfg, out


def _one_error_line(capsys, code, fragment):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("lth: error: ") and fragment in lines[-1], err


@pytest.mark.parametrize("case", ["report_out_file", "report_no_level", "export_out_folder", "wandb_sweep_folder",
                                  "ray_missing", "hparams_not_object", "quantize_read_only", "sensitivity_read_only",
                                  "sparsity_missing_seed", "sparsity_level_list"])
def test_former_tracebacks_are_one_line_with_exit_2(tiny_run, tmp_path, capsys, monkeypatch, case):
    import shutil
    import tempfile
    cfg, out = tiny_run
    run = out / cfg.run_id
    sweep = tmp_path / "s.toml"
    sweep.write_text((ROOT / "experiments" / "quickstart.toml").read_text())
    if case == "report_out_file":
        (tmp_path / "f").write_text("x")
        _one_error_line(capsys, main(["report", str(out), "--out", str(tmp_path / "f")]), "is a file")
    elif case == "report_no_level":
        copy = tmp_path / "store"
        shutil.copytree(out, copy)
        for c in copy.rglob("COMPLETE"):
            c.unlink()
        _one_error_line(capsys, main(["report", str(copy), "--out", str(tmp_path / "figs")]), "no completed level")
    elif case == "export_out_folder":
        _one_error_line(capsys, main(["export", str(run), "--level", "0", "--bits", "8", "--out", str(tmp_path)]),
                        "is a folder")
    elif case == "wandb_sweep_folder":
        _one_error_line(capsys, main(["sweep", str(sweep), "--wandb-sweep", str(tmp_path)]), "is a folder")
    elif case == "ray_missing":
        monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed: import raises ImportError
        _one_error_line(capsys, main(["sweep", str(sweep), "--executor", "ray", "--out", str(tmp_path / "o")]),
                        'pip install "lth[ray]"')
    elif case == "hparams_not_object":
        copy = tmp_path / "store"
        shutil.copytree(out, copy)
        (copy / cfg.run_id / "hparams.json").write_text("[1, 2]\n")
        _one_error_line(capsys, main(["report", str(copy), "--out", str(tmp_path / "figs")]), "not a JSON object")
    elif case in ("quantize_read_only", "sensitivity_read_only"):
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        def computed(*a, **k):
            raise AssertionError("computed before checking that the results can be written")

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)  # as root, chmod would not stop writes
        if case == "quantize_read_only":
            monkeypatch.setattr("lth.quant.quantize_run", computed)
            code = main(["quantize", str(run), "--bits", "8"])
        else:
            monkeypatch.setattr("lth.prune.sensitivity.sensitivity", computed)
            code = main(["sensitivity", str(run), "--level", "0"])
        _one_error_line(capsys, code, "level_000 is not writable")
    elif case == "sparsity_missing_seed":
        _one_error_line(capsys, main(["sparsity", str(run), "--seed", "7"]), "no 'ticket' member of seed 7; seeds: [0]")
    elif case == "sparsity_level_list":
        _one_error_line(capsys, main(["sparsity", str(run), "--arm", "nope"]), "levels: [0, 1], arms: ['ticket']")


@pytest.mark.parametrize("setting, fragment", [
    ("prune.rates={dense_9 = 0.3}", "prune.rates names layer 'dense_9', which model mlp does not have; its "
                                    "prunable layers: dense_0, dense_1, output"),
    ("prune.exclude=['dense9']", "prune.exclude names layer 'dense9'"),
    ("rewind.step=41", "rewind.step = 41 is past the end of training (40 steps)"),
    ("model.widths=[8]", None),  # mlp uses widths: fine (checked below with another model)
])
def test_settings_checked_against_the_model_fail_before_any_level_trains(tmp_path, capsys, setting, fragment):
    from helpers import TINY, toml_text
    exp = tmp_path / "e.toml"
    exp.write_text(toml_text({**TINY, "prune": {**TINY["prune"], "levels": 1}, "arms": ["ticket"]}))
    out = tmp_path / "out"
    if fragment is None:
        from lth.config import ConfigError, ExperimentConfig, ModelConfig, check_against_model
        cfg = ExperimentConfig(model=ModelConfig(name="lenet_300_100", widths=(8,)))
        with pytest.raises(ConfigError, match="model.widths = \\[8\\] is not used by model.name = 'lenet_300_100'"):
            check_against_model(cfg, {"dense_0": "dense", "output": "output"}, 10)
        return
    code = main(["lottery", str(exp), "--out", str(out), "--set", setting])
    _one_error_line(capsys, code, fragment)
    assert not list(out.rglob("level_*"))  # nothing trained


def test_seeds_outside_the_prng_range_are_a_config_error():
    from lth.config import SEED_LIMIT, ConfigError, ExperimentConfig
    for seeds in ([2**32], [-1], [SEED_LIMIT]):
        with pytest.raises(ConfigError, match=f"seeds = .* expected a non-empty list of distinct integers "
                                              f"in \\[0, {SEED_LIMIT}\\)"):
            ExperimentConfig.from_dict({"seeds": seeds})


def test_sweep_set_of_a_swept_key_replaces_that_axis(tmp_path, capsys):
    exp = tmp_path / "s.toml"
    exp.write_text('[train]\nsteps = 5\n[sweep]\n"prune.rate" = [0.2, 0.4]\n"seeds" = [[0], [1]]\n')
    assert main(["sweep", str(exp), "--dry-run", "--out", str(tmp_path / "o"), "--set", "prune.rate=0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("2 runs")
    assert all("prune.rate=0.5" in ln for ln in lines[:-1]) and not any("0.2" in ln or "0.4" in ln for ln in lines)


def test_docs_name_exactly_the_commands_that_take_set():
    import re
    text = (ROOT / "docs" / "commands.md").read_text()
    having = {name for name, p in _subcommands().items() if any("--set" in a.option_strings for a in p._actions)}
    assert having == {"train", "lottery", "sweep", "quantize"}
    m = re.search(r"^(.*?) take `--set section\.key=value`", text, re.M)
    assert m is not None and "Every command" not in text, "docs/commands.md must say which commands take --set"
    assert set(re.findall(r"`lth (\w+)`", m.group(1))) == having - {"quantize"}
    assert "`lth quantize`\nalso takes `--set quant.KEY=VALUE`" in text  # its quant settings only


@pytest.mark.slow
def test_sweep_waits_for_a_run_busy_in_another_process(tmp_path):
    import os
    from analysis import load_runs
    from lth.store import RunStore
    from lth.sweep import expand
    from helpers import TINY, toml_text
    exp = tmp_path / "s.toml"
    exp.write_text(toml_text({**TINY, "seeds": [0], "arms": ["ticket"], "prune": {**TINY["prune"], "levels": 0}}))
    (point,) = expand(exp)
    out = tmp_path / "o"
    held = RunStore(out, point.run_id).lock()
    held.__enter__()  # this process computes the run, as far as the sweep can tell
    env = {k: v for k, v in os.environ.items() if k != "LTH_FAILPOINT"}
    p = subprocess.Popen([sys.executable, "-m", "lth.cli", "sweep", str(exp), "--out", str(out), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        seen = ""
        for line in p.stderr:  # until the sweep says it waits (old code: exits 0 at once, leaving it unfinished)
            seen += line
            if "busy in another process" in line:
                break
        assert "waiting" in seen and point.run_id in seen, seen
    finally:
        held.__exit__(None, None, None)  # "the other process" dies without finishing: the sweep trains it
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "trained" in stdout and "waited for another process" in stdout
    assert set(load_runs(out)["run_id"]) == {point.run_id}


def test_divergence_is_printed_in_the_run_summary_and_marked_in_the_report(tiny_run, tmp_path, capsys):
    import shutil
    import pandas as pd
    from lth.cli.common import print_summary
    from lth.store import RunStore, parquet_bytes
    cfg, out = tiny_run
    copy = tmp_path / "store"
    shutil.copytree(out, copy)
    store = RunStore(copy, cfg.run_id)
    d = store.level_dir(1)
    files = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "COMPLETE"}
    m = pd.read_parquet(d / "metrics.parquet")
    m["diverged_step"] = 23  # as if the member's loss had exploded at step 23
    store.write_level(1, {**files, "metrics.parquet": parquet_bytes(m)})
    print_summary(store.path, 1.0)
    printed = capsys.readouterr().out
    assert "diverged: level 1 ticket seed 0 at step 23" in printed
    assert "accuracy (%)" in printed and "density (%)" in printed  # a person reads percent
    assert main(["report", str(copy), "--out", str(tmp_path / "figs")]) == 0
    s = pd.read_csv(tmp_path / "figs" / "summary.csv").set_index("level")
    assert s.loc[1, "diverged"] == 1 and s.loc[0, "diverged"] == 0
    assert "diverged" in (tmp_path / "figs" / "summary.md").read_text()
    assert "Black crosses mark" in (tmp_path / "figs" / "README.md").read_text()

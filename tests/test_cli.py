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

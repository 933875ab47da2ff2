"""`lth speed` and `lth sensitivity` take the run's lock, as the stages do: never a write under a grow."""

import threading

from lth.cli import main
from lth.store import RunStore

from helpers import tiny


def _run_folder(root):
    """A run folder with its hparams.json only (no level yet: a run whose first level is training)."""
    cfg = tiny(seeds=[0], arms=["ticket"])
    store = RunStore(root, cfg.run_id)
    store.write_hparams({**cfg.to_dict(), "run_id": cfg.run_id, "lth_version": "test", "num_steps": 40})
    return store


def test_speed_and_sensitivity_refuse_a_run_another_process_is_computing(tmp_path, capsys):
    store = _run_folder(tmp_path)
    run = str(store.path)
    held, release = threading.Event(), threading.Event()

    def grow():  # another writer (a grow) holds the run's lock, as lth lottery does while it trains
        with RunStore(tmp_path, store.run_id).lock():
            held.set()
            release.wait(60)

    t = threading.Thread(target=grow)
    t.start()
    try:
        assert held.wait(30)
        for argv in (["speed", run, "--levels", "0"], ["sensitivity", run, "--level", "0", "--densities", "0.5"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"run {store.run_id} in {tmp_path} is being computed by pid" in err, err
            assert err.count("\n") == 1  # one line, no traceback
    finally:
        release.set()
        t.join()
    assert not list(store.path.rglob("*.parquet"))  # nothing written
    # the lock free: both go on (and stop at the missing level, as before)
    assert main(["speed", run, "--levels", "0"]) == 2
    assert "not complete" in capsys.readouterr().err
    assert main(["sensitivity", run, "--level", "0", "--densities", "0.5"]) == 2
    assert "level 0" in capsys.readouterr().err

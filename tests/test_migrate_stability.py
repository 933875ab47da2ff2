"""`lth migrate` re-keys the linear-mode-connectivity results: their keys hash the run id."""

import pandas as pd

from lth.lottery.stability import (COLUMNS, REWIND_DIR, STABILITY_DIR, read_results, result_key, result_problem,
                                   write_result)
from lth.migrate import Move, migrate_run
from lth.store import RunStore, parquet_bytes


def _path_rows(run_id: str, rewind_step: int) -> pd.DataFrame:
    rows = [dict(run_id=run_id, level=0, arm="ticket", seed=s, density=1.0, rewind_step=rewind_step, point=p,
                 alpha=p / 2, test_error=0.1, test_loss=0.3, instability=0.02, loss_barrier=0.1, points=3,
                 bn_batches=0, wall_s=1.0) for s in (0, 1) for p in range(3)]
    return pd.DataFrame(rows, columns=COLUMNS)


def test_migrate_moves_stability_results_to_the_new_run_id(tmp_path):
    store = RunStore(tmp_path, "legacy")
    store.path.mkdir()
    metrics = pd.DataFrame({"run_id": ["legacy"], "x": [1]})
    store.write_level(0, {"metrics.parquet": parquet_bytes(metrics)})
    (store.path / "hparams.json").write_text("{}")
    pairs = [("ticket", 0), ("ticket", 1)]
    stage, rewind = store.level_dir(0) / STABILITY_DIR, store.path / REWIND_DIR / "level_000"
    write_result(stage, result_key("legacy", 0, 3, 0, pairs), _path_rows("legacy", 10))  # [stability] stage
    for k in (0, 5):  # lth stability --rewind-steps 0,5
        write_result(rewind, result_key("legacy", 0, 3, 0, pairs, rewind_step=k), _path_rows("legacy", k))
    (stage / "ffffffffffffffff.json").write_text("{}")  # a damaged result: left for a rerun to recompute

    migrate_run(Move(store.path, tmp_path / "renamed"))

    run = tmp_path / "renamed"
    stage, rewind = run / "level_000" / STABILITY_DIR, run / REWIND_DIR / "level_000"
    new = result_key("renamed", 0, 3, 0, pairs)
    assert result_problem(stage, new) is None  # what StabilityStage.pending looks for: found, not recomputed
    for k in (0, 5):
        assert result_problem(rewind, result_key("renamed", 0, 3, 0, pairs, rewind_step=k)) is None
    assert not (stage / f"{result_key('legacy', 0, 3, 0, pairs)}.parquet").exists()
    for folder, n in ((stage, 6), (rewind, 12)):
        rows = read_results(folder)
        assert len(rows) == n and set(rows["run_id"]) == {"renamed"}
    assert (stage / "ffffffffffffffff.json").exists()

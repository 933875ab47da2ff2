"""The W&B sink, read back from its offline files: one W&B run per member, grouped by run id, named
run id / arm / seed, the levels table, quant (any method), stability and mask summaries, the report's
figures, a monotone step axis, files in ``<run>/wandb/``."""

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from lth.wandb_log import WandbSink, level_row, log_report, quant_label


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _records(path: Path):
    """The protobuf records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of
    chunks with a 7-byte header crc32/length/type, after a 7-byte file header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            chunk, buf = buf + chunk, b""
            r = pb.Record()
            r.ParseFromString(chunk)
            yield r
        elif kind in (2, 3):
            buf += chunk


def read_offline(folder: Path) -> dict:
    """One offline run folder: its run record (id, name, group, job type, config), merged summary,
    history rows and table files."""
    out = {"history": [], "summary": {}, "config": {}}
    path, t0 = next(folder.glob("*.wandb")), time.time()
    while not any(r.WhichOneof("record_type") == "exit" for r in _records(path)) and time.time() - t0 < 30:
        time.sleep(0.2)  # W&B's writer process may still be flushing after run.finish() returned
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type,
                       tags=list(r.run.tags))
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    tables = folder / "files" / "media" / "table"  # <key>_<step>_<hash>.table.json, the latest per key
    out["tables"] = {p.relative_to(tables).as_posix().rsplit("_", 2)[0]: json.loads(p.read_text())
                     for p in sorted(tables.rglob("*.table.json"), key=lambda p: int(p.name.rsplit("_", 2)[1]))}
    out["images"] = sorted(p.name for p in (folder / "files" / "media").rglob("*.png"))
    return out


def offline_runs(run_dir: Path) -> dict[str, dict]:
    """name -> read_offline of every offline W&B run under ``<run_dir>/wandb/``."""
    runs = [read_offline(f) for f in sorted((run_dir / "wandb").glob("offline-run-*"))]
    return {r["name"]: r for r in runs}


def _metric_rows(level, arm, seed, density, steps=(10, 20), es=20):
    rows = []
    for step in steps:
        for split, acc in (("train", 0.5), ("val", 0.6 + step / 1000), ("test", 0.7 + step / 1000)):
            rows.append({"run_id": "abc", "level": level, "arm": arm, "seed": seed, "copy": 0, "member": 0,
                         "density": density, "step": step, "split": split, "loss": 1.0 - acc, "accuracy": acc,
                         "early_stop_step": es, "param_count": 100, "diverged_step": -1, "wall_s": 1.0})
    return rows


def test_level_row_reads_final_and_early_stop_accuracy():
    row = level_row(_metric_rows(2, "ticket", 0, 0.64, steps=(10, 20, 30), es=20))
    assert row["level"] == 2 and row["density"] == 0.64 and row["early_stop_step"] == 20
    assert row["test_accuracy"] == pytest.approx(0.73) and row["early_stop_test_accuracy"] == pytest.approx(0.72)
    assert row["best_val_accuracy"] == pytest.approx(0.63) and row["early_stop_at_last_step"] is False
    assert quant_label({"method": "float_ft", "bits": 4, "scheme": "sym"}) == "float_ft/w4"
    assert quant_label({"method": "ptq", "bits": 8, "scheme": "asym"}, ["scheme"]) == "ptq/w8/asym"
    assert quant_label({"method": "float_ft", "bits": float("nan")}) == "float_ft"


def test_the_sink_writes_one_grouped_run_per_member_with_tables_and_summaries(tmp_path):
    run_dir = tmp_path / "runs" / "abc123"
    sink = WandbSink("offline", "lth-test", "tiny", "abc123", {"train.lr": 0.1}, run_dir)
    sink.log_level(0, 20, _metric_rows(0, "ticket", 0, 1.0))
    sparsity = pd.DataFrame([{"level": 1, "arm": "ticket", "seed": 0, "member": 0, "layer": "Dense_0",
                              "kind": "weight", "shape": "(4, 3)", "count": 12, "kept": 6, "nonzero": 6,
                              "density": 0.5, "prunable": True}])
    sink.log_level(1, 20, _metric_rows(1, "ticket", 0, 0.5) + _metric_rows(1, "small_dense", 0, 0.5), sparsity)
    quant = pd.DataFrame([{"run_id": "abc123", "cell": "c", "level": 1, "arm": "ticket", "seed": 0, "bits": 4,
                           "method": m, "scheme": "sym", "accuracy": a, "float_accuracy": 0.7}
                          for m, a in (("ptq", 0.5), ("qat", 0.66), ("float_ft", 0.71))])
    sink.log_quant(1, quant)
    stab = pd.DataFrame([{"arm": "ticket", "seed": 0, "alpha": a, "test_error": e, "test_loss": e, "instability": 0.1,
                          "loss_barrier": 0.2} for a, e in ((0.0, 0.3), (0.5, 0.45), (1.0, 0.3))])
    sink.log_stability(1, stab)
    sink.close()
    assert not sink.failed
    assert not (run_dir / "wandb" / "wandb").exists()  # <run>/wandb/offline-run-*, not wandb/wandb
    runs = offline_runs(run_dir)
    assert set(runs) == {"abc123/ticket/0", "abc123/small_dense/0"}
    t = runs["abc123/ticket/0"]
    assert (t["group"], t["job_type"], t["id"], t["tags"]) == ("abc123", "ticket", "abc123-ticket-s0", ["tiny"])
    assert t["config"]["train.lr"] == 0.1 and t["config"]["experiment"] == "tiny" and t["config"]["seed"] == 0
    # learning curves on a monotone global step over the levels
    steps = [h["global_step"] for h in t["history"] if "global_step" in h]
    assert steps == [10, 20, 30, 40] and all("test/accuracy" in h for h in t["history"] if "global_step" in h)
    # the levels table holds every level so far (accuracy vs density is one chart)
    levels = t["tables"]["levels"]
    cols = levels["columns"]
    assert {"level", "density", "test_accuracy", "early_stop_step", "early_stop_test_accuracy"} <= set(cols)
    assert [r[cols.index("level")] for r in levels["data"]] == [0, 1]
    assert [r[cols.index("density")] for r in levels["data"]] == [1.0, 0.5]
    s = t["summary"]
    assert s["level_001/density"] == 0.5 and s["masks/Dense_0/density"] == 0.5
    # quant: whatever methods the rows hold, float_ft too
    assert (s["quant/level_001/ptq/w4/accuracy"], s["quant/level_001/qat/w4/accuracy"],
            s["quant/level_001/float_ft/w4/accuracy"]) == (0.5, 0.66, 0.71)
    assert s["stability/level_001/instability"] == 0.1 and s["stability/level_001/loss_barrier"] == 0.2
    assert {"masks/level_001", "quant/level_001", "stability/level_001"} <= set(t["tables"])
    small = runs["abc123/small_dense/0"]
    assert small["job_type"] == "small_dense" and small["summary"]["level_001/density"] == 0.5


def test_report_figures_are_logged_as_images(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run_dir = tmp_path / "runs" / "abc123"
    run_dir.mkdir(parents=True)
    (run_dir / "hparams.json").write_text(json.dumps({"name": "tiny", "log": {"wandb": "offline", "project": "p"}}))
    figs = tmp_path / "figures" / "tiny"
    figs.mkdir(parents=True)
    plt.plot([0, 1])
    plt.savefig(figs / "accuracy_vs_density.png")
    plt.close()
    assert log_report(tmp_path / "runs", tmp_path / "figures") == "abc123/report"
    report = offline_runs(run_dir)["abc123/report"]
    assert report["group"] == "abc123" and report["job_type"] == "report"
    assert len(report["images"]) == 1 and report["images"][0].startswith("accuracy_vs_density")
    assert report["summary"]["figures/tiny/accuracy_vs_density/_type"] == "image-file"
    assert log_report(tmp_path / "runs", tmp_path / "figures", mode="disabled") is None


def test_lth_report_wandb_logs_the_figures_it_wrote(tmp_path, monkeypatch, capsys):
    import analysis.report
    from lth.cli import main

    def fake_report(root, out, **kw):  # the figures of a report, without drawing them
        Path(out).mkdir(parents=True)
        Path(out, "accuracy_vs_density.png").write_bytes(_png())
        return {"accuracy_vs_density": "caption"}

    monkeypatch.setattr(analysis.report, "write_report", fake_report)
    run_dir = tmp_path / "runs" / "abc123"
    run_dir.mkdir(parents=True)
    (run_dir / "hparams.json").write_text(json.dumps({"name": "tiny", "log": {"wandb": "disabled"}}))
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "figs"), "--wandb"]) == 0
    assert "W&B: nothing logged" in capsys.readouterr().out  # the runs say log.wandb = disabled
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "figs2"), "--wandb", "offline"]) == 0
    assert "logged the figures to W&B run abc123/report" in capsys.readouterr().out
    assert offline_runs(run_dir)["abc123/report"]["images"]


def _png() -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    plt.figure(figsize=(1, 1))
    plt.savefig(buf, format="png")
    plt.close()
    return buf.getvalue()

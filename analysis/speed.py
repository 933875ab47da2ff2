"""Inference speed tables of an lth store (``level_NNN/speed.parquet``, written by ``lth speed``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .runs import NotAStoreError, folder_run_id

TABLE_COLUMNS = ["experiment", "model", "format", "batch", "level", "density", "bytes", "latency_s", "speedup"]


def _stderr(msg: str) -> None:
    print(f"lth: {msg}", file=sys.stderr)


def load_speed(root: str | Path, say=_stderr) -> pd.DataFrame:
    """One row per (run, level, member, format, batch) of every ``speed.parquet`` under ``root`` (a
    store or one run folder): density, latency_s (best of the timed repeats, seconds per call),
    median_s, throughput (examples/s), bytes, speedup (dense latency / latency at the same level
    and batch), max_abs_diff (vs the dense masked network; the fake-quant network for int8), and the
    machine and library versions. Empty when nothing was measured. An unreadable table (truncated)
    is skipped, and ``say`` (default: stderr) hears of it (``lth speed`` measures its level again)."""
    root = Path(root)
    if not root.is_dir():
        raise NotAStoreError(f"{root} is not a folder (expected an lth store, e.g. ./runs)")
    runs = [root] if (root / "hparams.json").is_file() else sorted(p.parent for p in root.glob("*/hparams.json"))
    frames = []
    for run in runs:
        for path in sorted(run.glob("level_[0-9][0-9][0-9]/speed.parquet")):
            if not (path.parent / "COMPLETE").is_file():
                continue
            try:
                df = pd.read_parquet(path)
            except Exception as e:  # noqa: BLE001 - name the file whatever pyarrow raised
                if say is not None:
                    say(f"skipped {path}: unreadable speed table ({type(e).__name__}); `lth speed {run}` "
                        "measures it again")
                continue
            frames.append(folder_run_id(df, run, path, say))
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["run_id", "member", "batch", "format", "level"], ignore_index=True)


def crossover(speed: pd.DataFrame) -> pd.DataFrame:
    """Per (run, member, format, batch): the crossover density, the highest measured density from
    which on (at it and at every lower measured density) the format is faster than dense; NaN when
    it never stays faster ("never faster"). ``first_faster_density``: the highest density where it is
    faster at all (one noisy win is enough). Also the best speedup and the density where it occurs."""
    rows = []
    keys = ["run_id", "experiment", "model", "member", "format", "batch"]
    for key, g in speed[speed["format"] != "dense"].groupby(keys, sort=True):
        g = g.sort_values("density")  # sparsest first
        faster = (g["speedup"] > 1.0).to_numpy()
        n = int(np.argmin(faster)) if not faster.all() else len(faster)  # leading run of wins from the sparse end
        d = float(g["density"].iloc[n - 1]) if n else float("nan")
        best = g.loc[g["speedup"].idxmax()]
        wins = g.loc[g["speedup"] > 1.0, "density"]
        rows.append({**dict(zip(keys, key)), "crossover_density": d,
                     "first_faster_density": float(wins.max()) if len(wins) else float("nan"),
                     "best_speedup": float(best["speedup"]),
                     "best_at_density": float(best["density"]), "densities": len(g)})
    columns = [*keys, "crossover_density", "first_faster_density", "best_speedup", "best_at_density", "densities"]
    return pd.DataFrame(rows, columns=columns)  # no rows (only dense was timed, e.g. a transformer): still the columns


def speed_table(speed: pd.DataFrame) -> pd.DataFrame:
    """(format, density, bytes, latency, speedup) rows for the report, densities in %, latency in ms."""
    t = speed[[c for c in TABLE_COLUMNS if c in speed]].copy()
    t["density"] = (100 * t["density"]).round(2)
    t["latency_s"] = 1e3 * t["latency_s"]
    t = t.rename(columns={"density": "weights remaining (%)", "latency_s": "latency (ms)"})
    return t.sort_values(["experiment", "batch", "format", "weights remaining (%)"],
                         ascending=[True, True, True, False], ignore_index=True)

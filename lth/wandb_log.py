"""Weights & Biases sink: one W&B run per member (run id, arm, seed). Never fatal.

The store is the source of truth and is written first; every W&B call here is wrapped so that a
W&B failure (no account, no network, a broken install) becomes one warning and logging stops.

What a member's W&B run holds (``offline`` by default: files in ``<run>/wandb/``, ``wandb sync``
uploads them later):

- identity: group = the lth run id (an experiment name is not unique across sweep points), name
  ``<run id>/<arm>/<seed>``, job type = the arm, the experiment name as a tag, every setting in
  the config;
- the learning curves: ``train/*``, ``val/*``, ``test/*`` against ``global_step`` (level x steps of
  a level + step: monotone over the levels); W&B's own ``_step`` only counts log calls;
- per level: ``level/*`` scalars against ``level`` and the ``levels`` table (level, density,
  param_count, final and early-stop accuracies, early-stop step) holding every level so far, so
  accuracy vs density is one chart; the mask summary (``masks/level_NNN``: per layer kept weights);
- later stages: ``quant/level_NNN`` tables and ``quant/level_NNN/<method>/w<bits>/accuracy``
  summaries for whatever methods the quant rows hold (ptq, qat, float_ft, ...), and stability paths
  (``stability/level_NNN`` tables, instability and loss barrier);
- :func:`log_report`: the figures of ``lth report`` as images, in one more run of the group.
"""

from __future__ import annotations

import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

# the settings of a quant row that name its method (beyond method and bits), in label order
QUANT_SETTING_COLUMNS = ("scheme", "granularity", "calibration", "act_bits", "act_order")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _settings() -> Any:
    import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.Settings(silent=True, console="off")


def level_row(rows) -> dict:
    """One member's summary of one level from its tidy metric rows (a DataFrame or a list of dicts:
    step, split, accuracy, density, early_stop_step, param_count): the row of the ``levels`` table.

    Accuracies are read at the last step and at the early-stop step (as stored, -1 when unknown)."""
    import pandas as pd

    df = pd.DataFrame(rows) if not isinstance(rows, pd.DataFrame) else rows
    last = int(df["step"].max())
    out: dict[str, Any] = {"level": int(df["level"].iloc[0]), "density": float(df["density"].iloc[0])}
    if "param_count" in df:
        out["param_count"] = int(df["param_count"].iloc[0])
    es = int(df["early_stop_step"].iloc[0]) if "early_stop_step" in df else -1
    out["early_stop_step"] = es
    out["early_stop_at_last_step"] = es == last
    for split in ("train", "val", "test"):
        s = df[df["split"] == split]
        if not len(s):
            continue
        out[f"{split}_accuracy"] = float(s.loc[s["step"] == last, "accuracy"].iloc[0])
        if split != "train":
            out[f"best_{split}_accuracy"] = float(s["accuracy"].max())
            at = s.loc[s["step"] == es, "accuracy"]
            out[f"early_stop_{split}_accuracy"] = float(at.iloc[0]) if len(at) else float("nan")
    return out


def quant_label(row: dict, varying: Iterable[str] = ()) -> str:
    """``<method>/w<bits>`` plus each of ``varying`` settings (those that differ within the rows),
    e.g. ``qat/w4``, ``float_ft/w4``, ``ptq/w8/asym/tensor``."""
    bits = row.get("bits")
    has_bits = isinstance(bits, numbers.Real) and bits == bits  # not missing, not NaN
    parts = [str(row.get("method", "?")), f"w{int(bits)}" if has_bits else ""]
    parts += [f"{k}{row[k]}" if k == "act_bits" else ("act_order" if row[k] else "") if k == "act_order" else str(row[k])
              for k in varying if k in row]
    return "/".join(p for p in parts if p)


def _table(df):
    import wandb
    return wandb.Table(dataframe=df.reset_index(drop=True))


class WandbSink:
    """Logs to one W&B run per member (arm, seed) of the lth run ``run_id``, resuming across processes.

    ``run_dir``: the run's store folder; W&B writes into ``<run_dir>/wandb/``. ``experiment``: the
    experiment name (a tag and a config value: several runs may share it)."""

    def __init__(self, mode: str, project: str, experiment: str, run_id: str, config: dict, run_dir: Path):
        self.mode, self.project, self.experiment = mode, project, experiment
        self.run_id, self.config, self.run_dir = run_id, config, Path(run_dir)
        self.runs: dict[tuple[str, int], Any] = {}
        self.levels: dict[tuple[str, int], dict[int, dict]] = {}  # member -> level -> levels-table row
        self.failed = mode == "disabled"

    def _fail(self, e: BaseException) -> None:
        warnings.warn(f"W&B logging disabled after an error ({type(e).__name__}: {e}); "
                      f"results are still written to the store", RuntimeWarning, stacklevel=3)
        self.failed = True

    def _run(self, arm: str, seed: int):
        key = (arm, int(seed))
        if key not in self.runs:
            import wandb
            self.run_dir.mkdir(parents=True, exist_ok=True)
            settings = _settings()
            run = wandb.init(
                mode=self.mode, project=self.project, group=self.run_id, job_type=arm,
                name=f"{self.run_id}/{arm}/{seed}", id=f"{self.run_id}-{arm}-s{seed}", resume="allow",
                dir=str(self.run_dir), tags=[self.experiment] if self.experiment else None,
                config={**self.config, "experiment": self.experiment, "arm": arm, "seed": int(seed),
                        "run_id": self.run_id},
                reinit="create_new", settings=settings)
            run.define_metric("global_step")
            run.define_metric("level")
            for split in ("train", "val", "test"):
                run.define_metric(f"{split}/*", step_metric="global_step")
            run.define_metric("level/*", step_metric="level")
            self.runs[key] = run
            self.levels[key] = self._stored_levels(arm, int(seed))
        return self.runs[key]

    def _stored_levels(self, arm: str, seed: int) -> dict[int, dict]:
        """The levels-table rows of a member's levels already in the store (a resumed run logs the
        whole table again, not only the levels trained by this process)."""
        import pandas as pd
        out = {}
        for d in sorted(self.run_dir.glob("level_[0-9][0-9][0-9]")):
            path = d / "metrics.parquet"
            if not (d / "COMPLETE").is_file() or not path.is_file():
                continue
            m = pd.read_parquet(path)
            m = m[(m["arm"] == arm) & (m["seed"] == seed) & ((m["copy"] == 0) if "copy" in m else True)]
            if len(m):
                row = level_row(m)
                out[row["level"]] = row
        return out

    def _guard(self, fn, *args) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - W&B must never kill the experiment
            self._fail(e)

    # ------------------------------------------------------------------ training
    def log_level(self, level: int, steps_per_level: int, rows: list[dict], sparsity=None) -> None:
        """rows: tidy metric rows of the members trained now at ``level`` (arm, seed, step, split, loss,
        accuracy, density, early_stop_step, ...); ``sparsity``: their per-layer mask rows (the level's
        ``sparsity.parquet`` rows, any members), logged as the mask summary."""
        self._guard(self._log_level, level, steps_per_level, rows, sparsity)

    def _log_level(self, level, steps_per_level, rows, sparsity) -> None:
        import pandas as pd
        df = pd.DataFrame(rows)
        if df.empty:
            return
        for (arm, seed), m in df.groupby(["arm", "seed"], sort=False):
            run = self._run(arm, int(seed))
            for step, at in m.groupby("step", sort=True):
                point = {"global_step": level * steps_per_level + int(step), "level": level,
                         "density": float(at["density"].iloc[0])}
                for r in at.itertuples():
                    point[f"{r.split}/loss"] = float(r.loss)
                    point[f"{r.split}/accuracy"] = float(r.accuracy)
                    if "bits_per_byte" in at:  # a language model (lth.train.lm_metrics)
                        point[f"{r.split}/bits_per_byte"] = float(r.bits_per_byte)
                run.log(point)
            row = level_row(m.assign(level=level))
            table = self.levels[arm, int(seed)]
            table[level] = row
            run.log({"level": level, **{f"level/{k}": v for k, v in row.items() if k != "level"},
                     "levels": _table(pd.DataFrame([table[k] for k in sorted(table)]))})
            for k, v in row.items():
                run.summary[f"level_{level:03d}/{k}"] = v
            if sparsity is not None and len(sparsity):
                s = pd.DataFrame(sparsity)
                s = s[(s["arm"] == arm) & (s["seed"] == seed)]
                if len(s):
                    s = s.drop(columns=[c for c in ("arm", "seed", "member") if c in s])
                    s = s.assign(**{c: s[c].astype(str) for c in s.columns if s[c].dtype == object})
                    run.log({f"masks/level_{level:03d}": _table(s)})
                    for r in s.itertuples():
                        run.summary[f"masks/{r.layer}/density"] = float(r.density)

    # ------------------------------------------------------------------ later stages
    def log_quant(self, level: int, rows) -> None:
        """Quant rows of ``level`` computed now (one per cell and seed; any ``method``: ptq, qat,
        float_ft, ...): a table and an accuracy summary per setting, on each member's run."""
        self._guard(self._log_quant, level, rows)

    def _log_quant(self, level, rows) -> None:
        import pandas as pd
        df = pd.DataFrame(rows)
        if df.empty:
            return
        varying = [c for c in QUANT_SETTING_COLUMNS if c in df and df[c].nunique() > 1]
        for (arm, seed), q in df.groupby(["arm", "seed"], sort=False):
            run = self._run(arm, int(seed))
            q = q.drop(columns=[c for c in ("arm", "seed", "run_id", "cell") if c in q])
            run.log({f"quant/level_{level:03d}": _table(q.assign(
                **{c: q[c].astype(str) for c in q.columns if q[c].dtype == object}))})
            for r in q.to_dict("records"):
                label = quant_label(r, varying)
                for col in ("accuracy", "float_accuracy", "compression", "size_bytes", "bits_per_byte",
                            "float_bits_per_byte"):
                    if col in r and r[col] is not None and not (col.endswith("per_byte") and pd.isna(r[col])):
                        run.summary[f"quant/level_{level:03d}/{label}/{col}"] = r[col]

    def log_stability(self, level: int, rows) -> None:
        """Path rows of ``level`` (``[stability]``: arm, seed, alpha, test_error, test_loss, instability,
        loss_barrier): the path table and the instability summary on each member's run."""
        self._guard(self._log_stability, level, rows)

    def _log_stability(self, level, rows) -> None:
        import pandas as pd
        df = pd.DataFrame(rows)
        if df.empty:
            return
        for (arm, seed), p in df.groupby(["arm", "seed"], sort=False):
            run = self._run(arm, int(seed))
            cols = [c for c in ("alpha", "test_error", "test_loss") if c in p]
            run.log({"level": level, f"stability/level_{level:03d}": _table(p[cols].sort_values("alpha")),
                     **{f"level/{k}": float(p[k].iloc[0]) for k in ("instability", "loss_barrier") if k in p}})
            for k in ("instability", "loss_barrier"):
                if k in p:
                    run.summary[f"stability/level_{level:03d}/{k}"] = float(p[k].iloc[0])

    def close(self) -> None:
        for run in self.runs.values():
            try:
                run.finish()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
        self.runs.clear()


def log_report(root: str | Path, figures: str | Path, mode: str | None = None) -> str | None:
    """Log the PNG figures under ``figures`` (``lth report``'s folder, subfolders too) as images to one
    W&B run ``<group>/report`` (job type ``report``), where the group is the run id of the store ``root``
    when it holds one run (files in ``<run>/wandb/``), else ``report`` (files in ``<root>/wandb/``).

    ``mode``: offline, online or disabled; default the runs' ``log.wandb``. Returns the W&B run's name,
    or None when nothing was logged (disabled, no figure). A W&B failure is a warning, never fatal."""
    import json
    root, figures = Path(root), Path(figures)
    runs = [root] if (root / "hparams.json").is_file() else sorted(p.parent for p in root.glob("*/hparams.json"))
    hparams = [json.loads((r / "hparams.json").read_text()) for r in runs]
    logs = [h.get("log", {}) for h in hparams]
    mode = mode or next((lg["wandb"] for lg in logs if "wandb" in lg), "offline")
    pngs = sorted(figures.rglob("*.png"))
    if mode == "disabled" or not pngs:
        return None
    group = runs[0].name if len(runs) == 1 else "report"
    where = runs[0] if len(runs) == 1 else root
    name = f"{group}/report"
    try:
        import wandb
        run = wandb.init(mode=mode, project=next((lg["project"] for lg in logs if "project" in lg), "lth"),
                         group=group, job_type="report", name=name, dir=str(where), reinit="create_new",
                         config={"run_ids": [r.name for r in runs],
                                 "experiments": sorted({h.get("name", "") for h in hparams})},
                         settings=_settings())
        try:
            run.log({f"figures/{p.relative_to(figures).with_suffix('').as_posix()}": wandb.Image(str(p))
                     for p in pngs})
        finally:
            run.finish()
    except Exception as e:  # noqa: BLE001 - W&B must never fail a report
        warnings.warn(f"W&B: the report's figures were not logged ({type(e).__name__}: {e})", RuntimeWarning,
                      stacklevel=2)
        return None
    return name

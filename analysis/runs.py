"""Load a results store into one tidy pandas DataFrame."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import pandas as pd

_KEYS = ["run_id", "experiment", "arm", "seed", "level", "density", "step", "split"]


class NotAStoreError(ValueError):
    """The folder holds no lth runs (or a file in it is unreadable); the message names the path."""


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def run_dirs(root: Path) -> list[Path]:
    """The run folders of a store (or ``[root]`` when ``root`` is one run folder)."""
    if (root / "hparams.json").is_file():
        return [root]
    return sorted(p.parent for p in root.glob("*/hparams.json"))


def complete_levels(run: Path, say=None) -> list[Path]:
    """Level folders that are complete, match their checksums and name their members (arm, seed);
    ``say(message)`` hears of the rest, and of a level a killed grow left in the middle of its swap."""
    from lth.store import RunStore

    store, out = RunStore(run.parent, run.name), []
    for d in sorted(run.glob("level_[0-9][0-9][0-9]")):
        problem = store.level_problem(int(d.name[len("level_"):])) or _members_problem(d)
        if problem is None:
            out.append(d)
        elif say is not None:
            say(f"skipped {d.name} of run {run.name}: {problem}")
    if say is not None:
        for side in sorted(run.glob("level_[0-9][0-9][0-9].prev")):
            if not side.with_suffix("").is_dir():
                say(f"skipped {side.stem} of run {run.name}: a grow was killed in the middle of its swap "
                    f"({side.name}); a rerun or `lth quantize` of the run finishes it")
    return out


def _members_problem(level_dir: Path) -> str | None:
    """None when the level's ``members.json`` (if any) lists objects with a string ``arm`` and an
    integer ``seed``; else why not (the file is checksummed, so lth did not write it so)."""
    from lth.store import StoreError, read_json

    path = level_dir / "members.json"
    if not path.is_file():
        return None
    try:
        members = read_json(path)
    except StoreError as e:
        return str(e)
    ok = isinstance(members, list) and all(
        isinstance(m, dict) and isinstance(m.get("arm"), str) and isinstance(m.get("seed"), int)
        and not isinstance(m.get("seed"), bool) for m in members)
    return None if ok else f"{path} is not a list of members with an arm and a seed"


_run_dirs, _complete_levels = run_dirs, complete_levels


def _stderr(msg: str) -> None:
    print(f"lth: {msg}", file=sys.stderr)


def _hparams(run: Path) -> dict:
    """A run's hparams.json, checked against its run id (StoreError naming the file otherwise)."""
    from lth.store import check_hparams, read_hparams

    h = read_hparams(run / "hparams.json")
    check_hparams(run / "hparams.json", h, run.name)
    return h


def load_runs(root: str | Path, run_ids: Iterable[str] | None = None, quant: bool = True,
              say=_stderr) -> pd.DataFrame:
    """One tidy table of every completed level under ``root``: float rows and quantized rows.

    Float rows: one per (run, arm, seed, level, step, split) of training, with run_id, experiment,
    arm, seed, level, density (fraction of prunable weights remaining), param_count, step, split,
    loss, accuracy, early_stop_step, diverged_step, member, wall_s, and ``bits = 32``, ``method =
    "float"``, ``size_bytes`` (the float32 network stored sparse, where the quant stage measured it).

    Quantized rows (``quant=True``, the default): one per (cell, seed) of the quant stage, with the
    same keys (run_id, arm, seed, level, density, param_count), ``split = "test"``, no step, and
    ``bits, method (ptq/qat), scheme, granularity, calibration, act_bits, size_bytes, compression``
    (vs the fp32 dense network), float_accuracy, val_accuracy, ...; and QAT's float controls
    (``method = "float_ft"``, ``bits = 32``, ``scheme = "float"``: :func:`float_ft_rows`).

    Stability copies (``[stability]``, ``copy`` > 0) are left out: each (run, arm, seed, level)
    appears once; their paths are in :func:`load_stability`.

    Both carry every hparam flattened with dotted names (``train.lr``, ``prune.rate``, ...).
    ``root`` may be a store or one run folder.

    Every level's files are verified against their checksums; ``say`` (default: stderr) is told of
    each level skipped as incomplete or corrupt. An hparams.json whose settings do not hash to its
    run id (edited) raises StoreError naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotAStoreError(f"{root} is not a folder (expected an lth store, e.g. ./runs)")
    runs = _run_dirs(root)
    if run_ids is not None:
        wanted = set(run_ids)
        runs = [r for r in runs if r.name in wanted]
    if not runs:
        raise NotAStoreError(f"{root} is not an lth store: no <run_id>/hparams.json inside")
    frames = []
    for run in runs:
        hparams = _hparams(run)
        flat = {k: v for k, v in _flatten(hparams).items() if k not in ("run_id",)}
        for level_dir in _complete_levels(run, say):
            path = level_dir / "metrics.parquet"
            try:
                df = pd.read_parquet(path)
            except Exception as e:  # noqa: BLE001 - name the file whatever pyarrow raised
                raise NotAStoreError(f"{path}: unreadable metrics table ({type(e).__name__}: {e})") from None
            df = folder_run_id(df, run, path, say)
            if "copy" in df:  # stability copies measure instability (load_stability), not accuracy
                df = df[df["copy"] == 0].drop(columns="copy")
            df.insert(1, "experiment", hparams.get("name", ""))
            for k, v in flat.items():
                if k not in df.columns:
                    df[k] = [v] * len(df)
            frames.append(df)
    if not frames:
        return pd.DataFrame(columns=_KEYS + ["loss", "accuracy", "early_stop_step"])
    df = pd.concat(frames, ignore_index=True)
    df = df.sort_values(["run_id", "level", "arm", "seed", "step", "split"], kind="stable", ignore_index=True)
    df = df.assign(bits=32, method="float", scheme="float", granularity="", calibration="", act_bits=32, act_order=False)
    q = load_quant(root, say=say) if quant else pd.DataFrame()
    if not q.empty and run_ids is not None:
        q = q[q["run_id"].isin(set(run_ids))]
    keys = ["run_id", "level", "arm", "seed"]
    if not q.empty and "float_size_bytes" in q:
        sizes = q.dropna(subset=["float_size_bytes"]).drop_duplicates(keys).set_index(keys)
        idx = pd.MultiIndex.from_frame(df[keys])
        df["size_bytes"] = sizes["float_size_bytes"].reindex(idx).to_numpy()
        df["compression"] = (sizes["fp32_dense_bytes"] / sizes["float_size_bytes"]).reindex(idx).to_numpy()
    else:
        df["size_bytes"], df["compression"] = float("nan"), float("nan")
    if not q.empty:
        q = q.assign(split="test")
        # cells stored before GPTQ's act_order existed did not use it
        q["act_order"] = q["act_order"].fillna(False).astype(bool) if "act_order" in q else False
        hp = df.drop_duplicates("run_id").set_index("run_id")
        extra = [c for c in df.columns if "." in c]  # the flattened hparams
        q = q.drop(columns=[c for c in extra if c in q]).join(hp[extra], on="run_id")
        if "diverged_step" in df:  # a member that diverged in training is marked on its quantized rows too
            div = df.drop_duplicates(keys).set_index(keys)["diverged_step"]
            q["diverged_step"] = div.reindex(pd.MultiIndex.from_frame(q[keys])).fillna(-1).astype(int).to_numpy()
        df = pd.concat([df, q], ignore_index=True)
    return df


def folder_run_id(df: pd.DataFrame, run: Path, path: Path, say=None) -> pd.DataFrame:
    """``df`` with the run id of the folder it was read from: one run id per folder, also while an
    interrupted ``lth migrate`` has rewritten the id in some of its files but not yet in the others;
    ``say`` hears of such a file."""
    if "run_id" not in df:
        return df
    if say is not None and (df["run_id"] != run.name).any():
        other = ", ".join(sorted(set(map(str, df["run_id"])) - {run.name}))
        say(f"{path} records run id {other}, not its folder's {run.name} (an interrupted `lth migrate`?"
            f" rerun it); read as run {run.name}")
    return df.assign(run_id=run.name)


def float_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The training (float) rows of a :func:`load_runs` table."""
    return df[df["method"] == "float"] if "method" in df else df


def quant_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The quantized rows of a :func:`load_runs` table (not the float rows, nor QAT's float_ft controls)."""
    return df[~df["method"].isin(["float", "float_ft"])] if "method" in df else df.iloc[:0]


def float_ft_rows(df: pd.DataFrame) -> pd.DataFrame:
    """QAT's float controls of a :func:`load_runs` table (``method = "float_ft"``, ``bits = 32``): each
    member that got QAT, fine-tuned in float with QAT's schedule (``qat_start``, ``qat_steps``,
    ``qat_lr``); the reference of every QAT row (:mod:`analysis.fair`)."""
    return df[df["method"] == "float_ft"] if "method" in df else df.iloc[:0]


def final_accuracy(df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean and std over seeds of the final ``split`` accuracy, per (run, level, arm)."""
    last = df[df["split"] == split]
    last = last[last["step"] == last.groupby(["run_id", "level", "arm", "seed"])["step"].transform("max")]
    return (last.groupby(["run_id", "level", "arm"])
            .agg(density=("density", "mean"), accuracy=("accuracy", "mean"),
                 accuracy_std=("accuracy", "std"), seeds=("seed", "nunique"))
            .reset_index())


def load_sparsity(root: str | Path) -> pd.DataFrame:
    """Per-layer sparsity reports of every completed level: run_id, level, arm, seed, layer, kind,
    shape, count, nonzero, kept, density, prunable."""
    root = Path(root)
    frames = []
    for run in _run_dirs(root) if root.is_dir() else []:
        for level_dir in _complete_levels(run):
            path = level_dir / "sparsity.parquet"
            if path.is_file():
                df = pd.read_parquet(path)
                df.insert(0, "run_id", run.name)
                frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _intact_cells(level_dir: Path, say=None) -> list[Path]:
    """The quant cells of a level whose table matches the checksum in its marker (``<cell>.json``,
    written after the table by the quant stage); a damaged or half-written cell is left out, and
    ``say`` hears of it. A cell computed with older numerics than its method's current ones (a fix since:
    :func:`lth.config.stale_numerics`) is left out too: the quant stage or `lth quantize` recomputes it."""
    from lth.config import stale_numerics
    from lth.store import read_json

    out = []
    for path in _intact_results(level_dir / "quant", "quant cell", say):
        meta = read_json(path.with_suffix(".json"))
        why = stale_numerics(meta.get("setting")) if isinstance(meta, dict) else None
        if why is None:
            out.append(path)
        elif say is not None:
            say(f"skipped a quant cell {why}: {path} (a rerun of the quant stage or `lth quantize` recomputes it)")
    return out


def _intact_results(folder: Path, what: str, say=None) -> list[Path]:
    """The tables in ``folder`` that match the checksum in their marker (``<key>.json``, written after
    the table); ``say`` hears of each damaged or half-written one, naming the file (the stage that
    wrote it recomputes it on its next run)."""
    from lth.store import marked_file_problem

    out = []
    for meta in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        problem = marked_file_problem(meta.with_suffix(".parquet"), meta)
        if problem is None:
            out.append(meta.with_suffix(".parquet"))
        elif say is not None:
            say(f"skipped a {what}: {problem}")
    return out


def load_quant(root: str | Path, say=_stderr) -> pd.DataFrame:
    """Quantization results of every completed level: one row per (cell, seed), i.e. per (run, level,
    arm, seed, bits, method, scheme, granularity, calibration, act_bits, ...), with accuracy,
    float_accuracy, size_bytes and compression (vs fp32 dense), plus the run's experiment name.
    Reads the quant stage's cells (``level_NNN/quant/``) and the older ``level_NNN/quant.parquet``;
    ``say`` (default: stderr) hears of each cell skipped as damaged or half-written."""
    root = Path(root)
    if not root.is_dir():
        raise NotAStoreError(f"{root} is not a folder (expected an lth store, e.g. ./runs)")
    frames = []
    for run in _run_dirs(root):
        name = _hparams(run).get("name", "")
        for level_dir in _complete_levels(run):
            paths = _intact_cells(level_dir, say)
            if (level_dir / "quant.parquet").is_file():
                paths.append(level_dir / "quant.parquet")
            for path in paths:
                try:
                    df = pd.read_parquet(path)
                except Exception as e:  # noqa: BLE001
                    raise NotAStoreError(f"{path}: unreadable quantization table ({type(e).__name__}: {e})") from None
                df = folder_run_id(df, run, path, say)
                df.insert(1, "experiment", name)
                frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_stability(root: str | Path, rewind: bool = True, say=_stderr) -> pd.DataFrame:
    """Linear-mode-connectivity paths of every completed level: one row per (run, level, rewind step,
    arm, seed, point), from the ``[stability]`` stage (``level_NNN/stability/``) and, with ``rewind``,
    from ``lth stability`` (``stability_rewind/level_NNN/``). Columns: run_id, experiment, level, arm,
    seed, density, rewind_step, source (``stage`` or ``rewind``), point, alpha (0 = copy 0, 1 = copy 1),
    test_error, test_loss, instability (max error on the path minus the mean of the two endpoint
    errors: the same on every point of a pair), loss_barrier (largest test loss above the straight
    line between the endpoint losses), points, bn_batches, wall_s. Only results whose table matches
    the checksum in its marker are read; ``say`` (default: stderr) hears of each one skipped."""
    root = Path(root)
    if not root.is_dir():
        raise NotAStoreError(f"{root} is not a folder (expected an lth store, e.g. ./runs)")
    frames = []

    def read(folder: Path, run: Path, name: str, source: str) -> None:
        for table in _intact_results(folder, "stability result", say):
            df = folder_run_id(pd.read_parquet(table), run, table, say)
            df.insert(1, "experiment", name)
            df["source"] = source
            frames.append(df)

    for run in _run_dirs(root):
        name = _hparams(run).get("name", "")
        for level_dir in _complete_levels(run):
            read(level_dir / "stability", run, name, "stage")
            if rewind:
                read(run / "stability_rewind" / level_dir.name, run, name, "rewind")
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df.sort_values(["run_id", "source", "level", "rewind_step", "arm", "seed", "point"], ignore_index=True)


def instability_table(stability: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, source, level, rewind step, arm, seed, points, bn_batches) of a
    :func:`load_stability` table:
    density, instability, loss_barrier, the endpoint errors (error_0, error_1) and the largest error
    on the path (max_error)."""
    if stability.empty:
        return pd.DataFrame()
    keys = ["run_id", "experiment", "source", "level", "rewind_step", "arm", "seed", "points", "bn_batches"]
    g = stability.groupby(keys, sort=True)
    out = g.agg(density=("density", "first"), instability=("instability", "first"),
                loss_barrier=("loss_barrier", "first"), max_error=("test_error", "max"))
    ends = stability.sort_values("alpha").groupby(keys, sort=True)["test_error"]
    out["error_0"], out["error_1"] = ends.first(), ends.last()
    return out.reset_index()


# ---------------------------------------------------------------------------- runs apart: swept keys, experiments

# settings that never tell two runs apart as results: how many members a run holds (a stored run grows
# by them), where its logs go, and its own id
_NOT_SWEPT = {"seeds", "arms", "prune.levels", "run_id", "name"}
_NOT_SWEPT_PREFIX = ("log.",)
_MEMBER_KEYS = {"seeds", "arms", "prune.levels"}  # how many members a run holds
# the settings that make two runs different experiments (another task or architecture, not a sweep point
# of one experiment: a sweep over train.lr, prune.rate, model.width or data.train_size stays one experiment)
EXPERIMENT_KEYS = ("data.name", "data.path", "model.name", "model.widths")


def _full_settings(h: dict) -> dict:
    """Every setting of a run's hparams, defaults filled in (a run's hparams.json may leave them out); a
    field added later whose default changes results reads as its legacy value (how the run was computed)."""
    from lth.config import ConfigError, ExperimentConfig, legacy_filled

    try:
        return ExperimentConfig.from_dict({k: v for k, v in legacy_filled(h).items()
                                           if k not in ("run_id", "mask")}).to_dict()
    except (ConfigError, TypeError, ValueError):  # an older or hand-made hparams.json: its own settings
        return h


def run_table(root: str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per run under ``root``: run_id, experiment and every setting flattened with dotted names
    (``prune.rate``, ``train.lr``, ...), defaults filled in."""
    rows = []
    for run in _run_dirs(Path(root)):
        if run_ids is not None and run.name not in set(run_ids):
            continue
        h = _hparams(run)
        flat = _flatten(_full_settings(h))
        rows.append({"run_id": run.name, "experiment": h.get("name", ""),
                     **{k: v for k, v in flat.items() if k not in ("run_id", "name")}})
    return pd.DataFrame(rows)


def _settings_of(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run of a runs table or a :func:`load_runs` table: run_id and its dotted settings."""
    cols = ["run_id"] + [c for c in df.columns if "." in c]
    return df[cols].drop_duplicates("run_id").set_index("run_id")


def swept_keys(df: pd.DataFrame, members: bool = False) -> list[str]:
    """The dotted settings whose value differs between the runs of ``df`` (a :func:`run_table` or a
    :func:`load_runs` table), in column order; members of runs are told apart by these keys. ``members``:
    also the dotted settings that say how many members a run holds (``prune.levels``), which label no
    result but say what a run's rows cover (:func:`analysis.summary.summarize` carries them)."""
    s = _settings_of(df)
    keys = []
    for c in s.columns:
        if (c in _NOT_SWEPT and not (members and c in _MEMBER_KEYS)) or c.startswith(_NOT_SWEPT_PREFIX):
            continue
        if s[c].map(repr).nunique() > 1:  # repr: NaN, tuples and None compare by value
            keys.append(c)
    return keys


def run_labels(df: pd.DataFrame, keys: list[str] | None = None) -> dict[str, str]:
    """run_id -> ``"prune.rate=0.2, train.lr=0.1"`` from the swept keys (default :func:`swept_keys`);
    the run id itself when no key tells the runs apart."""
    keys = swept_keys(df) if keys is None else keys
    s = _settings_of(df) if keys else pd.DataFrame(index=pd.Index(df["run_id"].unique(), name="run_id"))
    out = {}
    for run_id, row in s.iterrows():
        out[run_id] = ", ".join(f"{k}={_fmt(row[k])}" for k in keys) if keys else str(run_id)
    return out


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(map(str, v)) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def with_settings(df: pd.DataFrame, runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``df`` with the ``keys`` columns of ``runs`` (a :func:`run_table`) merged on run_id (replacing any
    column of that name: hparams.json may leave a default out, the runs table fills it in)."""
    keys = [k for k in keys if k in runs.columns]
    extra = runs.set_index("run_id")[keys]
    out = df.drop(columns=[k for k in keys if k in df.columns])
    return out.join(extra, on="run_id")


def experiments(runs: pd.DataFrame) -> dict[str, list[str]]:
    """The experiments of a :func:`run_table`: runs with the same name, data set and model (the
    :data:`EXPERIMENT_KEYS`) are one experiment; its other swept settings are sweep points. Name -> run
    ids; a name shared by different data sets or models gets the first run id appended."""
    cols = ["experiment"] + [c for c in EXPERIMENT_KEYS if c in runs.columns]
    key = runs[cols].map(repr).agg("|".join, axis=1)
    groups: dict[str, list[str]] = {}
    for k in dict.fromkeys(key):
        ids = sorted(runs.loc[key == k, "run_id"])
        name = str(runs.loc[key == k, "experiment"].iloc[0]) or "experiment"
        alone = name not in groups and (runs["experiment"] == name).sum() == len(ids)
        groups[name if alone else f"{name}_{ids[0]}"] = ids
    return groups

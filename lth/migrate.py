"""``lth migrate``: rename run folders written before runs could grow to their current run ids.

Run ids used to hash ``prune.levels``, ``seeds`` and ``arms`` too (:attr:`ExperimentConfig.legacy_run_id`);
now they do not (:attr:`ExperimentConfig.run_id`), so a rerun with more levels, seeds or arms grows
the stored run. Stores written before stay readable under their old names (``lth report``,
``analysis.load_runs``, :class:`lth.stored.StoredRun` accept either scheme), but a rerun looks for the
new id: migrating moves each legacy run folder to its new id and rewrites the run id where it is
recorded (``hparams.json``, the ``run_id`` column of each level's metrics and the level's COMPLETE
checksums, each quant cell and each linear-mode-connectivity result (``[stability]``'s
``level_NNN/stability/``, ``lth stability``'s ``stability_rewind/``), whose keys hash the run id, and the
tables later commands added to a level, e.g. ``speed.parquet``). Nothing else changes (every other file of a level is carried
across); old weights stay bit for bit. A run whose new id's folder already exists (a run of the same
settings with other seeds, arms or levels) is refused, naming both folders, before anything is changed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .config import ConfigError, stored_run_id
from .quant.stage import QUANT_DIR, cell_id_of
from .lottery.stability import REWIND_DIR, STABILITY_DIR, result_key, result_problem, write_result
from .store import (COMPLETE, RunStore, StoreError, atomic_write_bytes, atomic_write_json, check_hparams,
                    marked_file_problem, parquet_bytes, read_hparams, read_json, read_sums)


@dataclass(frozen=True)
class Move:
    old: Path
    new: Path


def plan(root: str | Path) -> list[Move]:
    """The legacy run folders under ``root`` and where they go; StoreError (nothing changed) when a
    new id's folder exists already or two legacy runs would take one new id."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"{root} is not a folder (expected an lth store, e.g. ./runs)")
    moves: list[Move] = []
    for run in sorted(p.parent for p in root.glob("*/hparams.json")):
        hparams = read_hparams(run / "hparams.json")
        check_hparams(run / "hparams.json", hparams, run.name)  # not edited: hashes to its name (either scheme)
        if isinstance(hparams.get("mask"), dict):
            continue  # a `train --mask` run: one id scheme only
        try:
            new = stored_run_id(hparams, str(run / "hparams.json"))
        except ConfigError as e:
            raise StoreError(f"{run / 'hparams.json'}: settings not readable by this lth ({e})") from None
        if new == run.name:
            continue
        moves.append(Move(run, root / new))
    taken: dict[Path, Path] = {}
    for m in moves:
        if m.new.exists():
            raise StoreError(f"cannot migrate {m.old}: its new run id's folder {m.new} exists already (the same "
                             "settings with other seeds, arms or levels); move one of them aside first")
        if m.new in taken:
            raise StoreError(f"cannot migrate both {taken[m.new]} and {m.old}: they get one new run id "
                             f"{m.new.name} (the same settings with other seeds, arms or levels); move one aside")
        taken[m.new] = m.old
    return moves


def migrate(root: str | Path, *, dry_run: bool = False, say: Callable[[str], None] = print) -> list[Move]:
    """Move every legacy run folder under ``root`` to its new run id (see the module docstring)."""
    moves = plan(root)
    for m in moves:
        say(f"{'would move' if dry_run else 'moving'} {m.old} -> {m.new}")
        if not dry_run:
            migrate_run(m)
    if not moves:
        say(f"{root}: every run folder has its current run id; nothing to migrate")
    return moves


def migrate_run(move: Move) -> None:
    """Rewrite the run id recorded in one run folder, under its lock, then rename the folder.

    Each step is atomic and a rerun redoes what a killed one left: quant cells are written under
    their new id before the old one is removed, a level is swapped in whole (RunStore.write_level),
    hparams.json is rewritten last and the folder renamed after it."""
    old_id, new_id = move.old.name, move.new.name
    store = RunStore(move.old.parent, old_id)
    with store.lock():
        for d in sorted(move.old.glob("level_[0-9][0-9][0-9]")):
            level = int(d.name[len("level_"):])
            _migrate_cells(d, level, new_id)
            _migrate_stability(d / STABILITY_DIR, level, old_id, new_id)
            _migrate_stability(move.old / REWIND_DIR / d.name, level, old_id, new_id, rewind=True)
            if store.level_problem(level) is not None:
                continue  # incomplete: a rerun recomputes it anyway
            sums = read_sums(d / COMPLETE)
            files = {name: (d / name).read_bytes() for name in sums}
            changed = False
            for name in ("metrics.parquet", "quant.parquet"):
                if name in files:
                    df = pd.read_parquet(d / name)
                    if "run_id" in df and (df["run_id"] != new_id).any():
                        files[name] = parquet_bytes(df.assign(run_id=new_id))
                        changed = True
            _migrate_unlisted(d, set(sums), new_id)
            if changed:
                store.write_level(level, files)  # carries the level's other files across
        hparams = read_hparams(move.old / "hparams.json")
        atomic_write_json(move.old / "hparams.json", {**hparams, "run_id": new_id})
    os.replace(move.old, move.new)


def _migrate_unlisted(level_dir: Path, listed: set[str], new_id: str) -> None:
    """Rewrite the run id in the tables later commands added to a level, outside its COMPLETE
    checksums (``speed.parquet``); a table that cannot be read is left as it is (its reader says so)."""
    for path in sorted(level_dir.glob("*.parquet")):
        if path.name in listed:
            continue
        try:
            df = pd.read_parquet(path)
        except Exception:  # noqa: BLE001 - damaged: `lth speed` replaces it, the report skips it
            continue
        if "run_id" in df and (df["run_id"] != new_id).any():
            atomic_write_bytes(path, parquet_bytes(df.assign(run_id=new_id)))


def _migrate_cells(level_dir: Path, level: int, new_id: str) -> None:
    qdir = level_dir / QUANT_DIR
    for meta_path in sorted(qdir.glob("*.json")) if qdir.is_dir() else []:
        table = meta_path.with_suffix(".parquet")
        if marked_file_problem(table, meta_path) is not None:
            continue  # damaged or half-written: the quant stage recomputes it
        meta = read_json(meta_path)
        if meta.get("run_id") == new_id:
            continue
        if not isinstance(meta.get("arm"), str) or not isinstance(meta.get("setting"), dict):
            continue  # a marker without its arm and setting: the quant stage recomputes the cell
        cid = cell_id_of(new_id, level, meta["arm"], meta["setting"])
        df = pd.read_parquet(table).assign(run_id=new_id, cell=cid)
        data = parquet_bytes(df)
        atomic_write_bytes(qdir / f"{cid}.parquet", data)
        atomic_write_json(qdir / f"{cid}.json", {**meta, "run_id": new_id, "seeds": [int(s) for s in df["seed"]],
                                                 "sha256": hashlib.sha256(data).hexdigest()})
        meta_path.unlink()
        table.unlink()



def _migrate_stability(folder: Path, level: int, old_id: str, new_id: str, rewind: bool = False) -> None:
    """Re-key the path results in ``folder`` (their key hashes the run id, :func:`lth.lottery.stability.result_key`)
    and rewrite the run id in their rows, so the stages find them under the new id instead of recomputing.
    The key is rebuilt from a table's own rows (level, pairs, points, bn_batches, rewind step); a table
    whose rows do not give back its old key, or that is damaged, is left as it is (a rerun recomputes it)."""
    for meta_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if result_problem(folder, meta_path.stem) is not None:
            continue
        df = pd.read_parquet(meta_path.with_suffix(".parquet"))
        if df.empty or not {"run_id", "arm", "seed", "points", "bn_batches", "rewind_step"} <= set(df.columns):
            continue
        pairs = sorted({(str(a), int(s)) for a, s in zip(df["arm"], df["seed"])})
        keys = [result_key(rid, level, int(df["points"].iloc[0]), int(df["bn_batches"].iloc[0]), pairs,
                           int(df["rewind_step"].iloc[0]) if rewind else None) for rid in (old_id, new_id)]
        if meta_path.stem != keys[0]:
            continue  # already under the new id (a rerun of a killed migrate), or not a key we can rebuild
        write_result(folder, keys[1], df.assign(run_id=new_id))  # the table, then its marker
        meta_path.unlink()
        meta_path.with_suffix(".parquet").unlink()

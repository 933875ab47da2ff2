"""One experiment, whole pipeline: train + prune (:mod:`lth.lottery`), then quantize
(:mod:`lth.quant.stage`), level by level.

Each level's quant cells are computed as soon as the level is complete (trained now or found in
the store), under the run's lock, with the data set and model the training loaded. Stages are keyed
apart: the training run id never sees ``quant.*``, and each quant cell is keyed by (run id,
level, arm, setting), so a rerun that changes only ``quant.*`` trains nothing and computes only
the new cells. Several experiments that differ only in ``quant.*`` are one training run with
several quant stages.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

from .config import ExperimentConfig, QuantConfig
from .lottery.groups import run_group
from .lottery.copies import copy_arms, stability_levels
from .lottery.runner import Lottery, read_members
from .lottery.stability import StabilityStage
from .quant.stage import QuantStage, pending, quant_levels
from .store import RunBusyError, RunStore, prepare_root
from .stored import StoredRun


def quant_stages(cfgs: Iterable[ExperimentConfig]) -> dict[str, list[QuantConfig]]:
    """run id -> the distinct quant stages of the experiments that share it."""
    out: dict[str, list[QuantConfig]] = {}
    for cfg in cfgs:
        stages = out.setdefault(cfg.run_id, [])
        if cfg.quant is not None and cfg.quant not in stages:
            stages.append(cfg.quant)
    return out


def stability_pending(cfg: ExperimentConfig, run_dir: str | Path) -> list[int]:
    """Complete levels whose stored stability copies have no (intact) path result yet (``[stability]``)."""
    if not cfg.stability.enabled:
        return []
    run_dir = Path(run_dir)
    store = RunStore(run_dir.parent, run_dir.name)
    run = StoredRun(run_dir, cfg, {"run_id": cfg.run_id}, None, None)  # file names only: no data, no model
    stage = StabilityStage(run, cfg.stability)
    return [level for level in stability_levels(cfg) if store.is_complete(level) and stage.pending(level)]


def missing_copies(cfg: ExperimentConfig, run_dir: str | Path) -> list[int]:
    """Complete levels that ``[stability]`` names but that were trained without copies (no path to evaluate)."""
    store = RunStore(Path(run_dir).parent, Path(run_dir).name)
    return [level for level in stability_levels(cfg) if copy_arms(cfg, level) and store.is_complete(level)
            and not any(m.copy for m in read_members(store.level_dir(level)))] if cfg.stability.enabled else []


def run_status(cfg: ExperimentConfig, out: str | Path, stages: list[QuantConfig] | None = None) -> dict:
    """What a run still needs: ``{"levels": complete levels, "of": total, "cells": pending quant cells,
    "stability": levels with pending stability results}``.

    Reads file names and checksums only (no data, no compiling).
    """
    store = RunStore(out, cfg.run_id)
    n = cfg.prune.levels + 1
    done = sum(store.is_complete(level) for level in range(n)) if store.path.exists() else 0
    stages = [cfg.quant] if stages is None and cfg.quant is not None else (stages or [])
    cells = sum(len(pending(cfg, store.path, qc)) for qc in stages)
    stab = len(stability_pending(cfg, store.path)) if store.path.exists() else 0
    return {"levels": done, "of": n, "cells": cells, "stability": stab}


def run_experiments(cfgs: Iterable[ExperimentConfig], out: str | Path, *, progress: bool | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Run or resume the whole pipeline of experiments that share a population group.

    Experiments with the same training run id (they differ only in ``quant.*``) train once and
    run each of their quant stages. Returns run_id -> 'trained' (levels trained, and any quant
    cells computed), 'quantized' (only quant cells computed), 'complete' (nothing to do) or
    'busy: <why>'.
    """
    cfgs = list(cfgs)
    root = prepare_root(out)
    stages = quant_stages(cfgs)
    first: dict[str, ExperimentConfig] = {}
    for cfg in cfgs:
        first.setdefault(cfg.run_id, cfg)
    before = {rid: run_status(cfg, root, stages[rid]) for rid, cfg in first.items()}
    for rid, cfg in first.items():
        missing = missing_copies(cfg, root / rid)
        if missing:
            print(f"lth: run {rid}: level(s) {', '.join(map(str, missing))} were trained without [stability] copies, "
                  "so they have no path to evaluate (copies are extra members of a level: delete a level's folder "
                  "to retrain it with them)", file=sys.stderr)
    opened: dict[str, StoredRun] = {}
    stabs: dict[str, StabilityStage] = {}  # one compiled path program per run

    def finished(cfg: ExperimentConfig) -> bool:
        s = before[cfg.run_id]
        return s["levels"] == s["of"] and s["cells"] == 0 and s["stability"] == 0

    def stored(lot: Lottery) -> StoredRun:
        run = opened.get(lot.cfg.run_id)
        if run is None:
            run = opened[lot.cfg.run_id] = StoredRun.open(lot.store.path, lot.data, lot.model)
        return run

    def after_level(lot: Lottery, level: int) -> None:
        if level in stability_pending(lot.cfg, lot.store.path):
            stabs.setdefault(lot.cfg.run_id, StabilityStage(stored(lot), lot.cfg.stability, log=log)).run_level(level)
        for qc in stages[lot.cfg.run_id]:
            if level not in quant_levels(lot.cfg, qc) or not pending(lot.cfg, lot.store.path, qc, [level]):
                continue
            QuantStage(stored(lot), qc, log=log).run_level(level)

    status = run_group(list(first.values()), root, progress=progress, finished=finished, after_level=after_level)
    for rid, s in status.items():
        if s == "trained" and before[rid]["levels"] == before[rid]["of"]:
            status[rid] = "quantized"
    return status


def run_experiment(cfg: ExperimentConfig, out: str | Path, *, progress: bool | None = None,
                   log: Callable[[str], None] | None = None) -> RunStore:
    """Run or resume one experiment (every level, then its quant cells as each level completes).

    A finished run with every quant cell done returns at once, without loading data.
    Raises RunBusyError when another process is computing the run.
    """
    status = run_experiments([cfg], out, progress=progress, log=log)
    s = status[cfg.run_id]
    if s.startswith("busy"):
        raise RunBusyError(s.partition(": ")[2])
    return RunStore(prepare_root(out), cfg.run_id)

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

import dataclasses
from pathlib import Path
from typing import Callable, Iterable

from .config import ExperimentConfig, QuantConfig
from .lottery.groups import run_group
from .lottery.copies import stability_levels
from .lottery.runner import Lottery, missing_members, stored_members
from .lottery.stability import StabilityStage
from .quant.stage import QuantStage, pending, quant_levels
from .store import RunBusyError, RunStore, prepare_root
from .stored import StoredRun


def merged_configs(cfgs: Iterable[ExperimentConfig]) -> dict[str, ExperimentConfig]:
    """run id -> one config with the union of the seeds and arms, and the most levels, of the
    experiments that share the run id (they differ only in those and in ``quant.*``): the run is
    trained once, to hold every member any of them wants."""
    out: dict[str, ExperimentConfig] = {}
    for cfg in cfgs:
        base = out.get(cfg.run_id)
        if base is None:
            out[cfg.run_id] = cfg
            continue
        seeds = tuple(base.seeds) + tuple(s for s in cfg.seeds if s not in base.seeds)
        arms = tuple(base.arms) + tuple(a for a in cfg.arms if a not in base.arms)
        levels = max(base.prune.levels, cfg.prune.levels)
        out[cfg.run_id] = dataclasses.replace(base, seeds=seeds, arms=arms,
                                              prune=dataclasses.replace(base.prune, levels=levels))
    return out


def stability_pending(cfg: ExperimentConfig, run_dir: str | Path, levels: Iterable[int] | None = None) -> list[int]:
    """Complete levels (of ``levels``, default all) whose stored stability copies have no (intact) path
    result yet (``[stability]``)."""
    if not cfg.stability.enabled:
        return []
    run_dir = Path(run_dir)
    store = RunStore(run_dir.parent, run_dir.name)
    run = StoredRun(run_dir, cfg, {"run_id": cfg.run_id}, None, None)  # file names only: no data, no model
    stage = StabilityStage(run, cfg.stability)
    wanted = stability_levels(cfg) if levels is None else [lv for lv in levels if lv in stability_levels(cfg)]
    return [level for level in wanted if store.is_complete(level) and stage.pending(level)]


def quant_stages(cfgs: Iterable[ExperimentConfig]) -> dict[str, list[tuple[ExperimentConfig, QuantConfig]]]:
    """run id -> the distinct quant stages of the experiments that share it, each with its experiment
    (whose levels, arms and seeds it quantizes)."""
    out: dict[str, list] = {}
    for cfg in cfgs:
        stages = out.setdefault(cfg.run_id, [])
        if cfg.quant is not None and all((c.seeds, c.arms, c.prune.levels, q) != (cfg.seeds, cfg.arms,
                                                                                  cfg.prune.levels, cfg.quant)
                                         for c, q in stages):
            stages.append((cfg, cfg.quant))
    return out


def run_status(cfg: ExperimentConfig, out: str | Path, stages: list | None = None) -> dict:
    """What a run still needs: ``{"levels": levels holding every wanted member, "of": total, "cells":
    pending quant cells, "new_levels": levels not stored at all, "seeds"/"arms": seeds and arms that
    the stored levels lack}`` (a run that grows by levels, seeds or arms).

    ``stages``: QuantConfigs of ``cfg``, or (experiment, QuantConfig) pairs; default ``cfg.quant``.
    Reads file names, members files and checksums only (no data, no compiling).
    """
    store = RunStore(out, cfg.run_id)
    n = cfg.prune.levels + 1
    done, new_levels, seeds, arms = 0, 0, set(), set()
    for level in range(n):
        if not store.path.exists() or not store.is_complete(level):
            new_levels += 1
            continue
        main, small = missing_members(store, cfg, level)
        if not main and not small:
            done += 1
            continue
        have_main, have_small = stored_members(store.level_dir(level))
        have = have_main + have_small
        seeds |= {m.seed for m in main + small if all(h.seed != m.seed for h in have)}
        arms |= {m.arm for m in main + small if all(h.arm != m.arm for h in have)}
    stages = [cfg.quant] if stages is None and cfg.quant is not None else (stages or [])
    pairs = [st if isinstance(st, tuple) else (cfg, st) for st in stages]
    cells = sum(len(pending(c, store.path, qc)) for c, qc in pairs)
    stab = len(stability_pending(cfg, store.path)) if store.path.exists() else 0
    return {"levels": done, "of": n, "cells": cells, "stability": stab, "new_levels": new_levels,
            "seeds": len(seeds), "arms": len(arms)}


def run_experiments(cfgs: Iterable[ExperimentConfig], out: str | Path, *, progress: bool | None = None,
                    log: Callable[[str], None] | None = None) -> dict[str, str]:
    """Run or resume the whole pipeline of experiments that share a population group.

    Experiments with the same training run id (they differ only in ``quant.*``, seeds, arms or
    levels) are merged into one run with the union of their members (:func:`merged_configs`), trained
    once, and run each of their quant stages. Returns run_id -> 'trained' (members trained, and any
    quant cells computed), 'quantized' (only quant cells computed), 'complete' (nothing to do) or
    'busy: <why>'.
    """
    cfgs = list(cfgs)
    root = prepare_root(out)
    stages = quant_stages(cfgs)
    first = merged_configs(cfgs)
    for rid in first:  # a level swap a killed grow left half done, before the store is judged finished
        RunStore(root, rid).finish_swaps()
    before = {rid: run_status(cfg, root, stages[rid]) for rid, cfg in first.items()}
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
        sink = lot.sink  # W&B gets each later stage's rows too (None: disabled)
        if stability_pending(lot.cfg, lot.store.path, [level]):
            rows = stabs.setdefault(lot.cfg.run_id, StabilityStage(stored(lot), lot.cfg.stability,
                                                                   log=log)).run_level(level)
            if sink is not None:
                sink.log_stability(level, rows)
        for cfg, qc in stages[lot.cfg.run_id]:
            if level not in quant_levels(cfg, qc) or not pending(cfg, lot.store.path, qc, [level]):
                continue
            rows = QuantStage(stored(lot), qc, log=log, cfg=cfg).run_level(level)
            if sink is not None:
                sink.log_quant(level, rows)

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

"""Population groups: several runs that train each level together as one vmapped population.

Runs with equal :func:`~lth.lottery.runner.population_key` share the data set, model, training and rewinding, so one
compiled engine trains the members of all of them; each run's share is stored in its own folder.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

from ..config import ExperimentConfig
from ..store import RunBusyError, RunStore, parquet_bytes, prepare_root
from ..wandb_log import WandbSink
from .runner import LevelPlan, Lottery, open_sink, population_key, run_is_finished, warn_few_evals


def run_group(cfgs, out: str | Path, *, progress: bool | None = None,
              finished: Callable[[ExperimentConfig], bool] | None = None,
              after_level: Callable[["Lottery", int], None] | None = None) -> dict[str, str]:
    """Run or resume several runs of one population group (equal :func:`population_key`).

    Level by level, the members that each run still needs at the level (all of a new level; the new
    seeds' and arms' of a run that grows) train as one vmapped population; each run's share of the
    result is stored in its own folder, exactly as a run alone would store it. The dense level depends only on the seed within a group, so each seed's dense
    network is trained once and stored in every run that has the seed. A member's numbers equal
    those of the run trained alone to float tolerance (the batched matmuls may round differently).

    ``finished(cfg)`` says a run needs nothing (default: every level complete); ``after_level(lottery,
    level)`` runs once a level of a run is complete (the pipeline's later stages), under the run's lock.
    Returns run_id -> 'trained' | 'complete' | 'busy: <why>' (another process holds the run).
    """
    cfgs = list(cfgs)
    root = prepare_root(out)
    finished = finished or (lambda c: run_is_finished(RunStore(root, c.run_id), c))
    status: dict[str, str] = {}
    todo = []
    for cfg in cfgs:
        if finished(cfg):
            status[cfg.run_id] = "complete"
        else:
            todo.append(cfg)
    keys = {population_key(c) for c in todo}
    if len(todo) > 1 and (None in keys or len(keys) > 1):  # Lottery(share=...) relies on this check
        raise ValueError(f"runs {[c.run_id for c in todo]} do not share a population_key; group them first")
    with contextlib.ExitStack() as stack_:
        lots: list[Lottery] = []
        for cfg in todo:
            try:
                stack_.enter_context(RunStore(root, cfg.run_id).lock())
            except RunBusyError as e:
                status[cfg.run_id] = f"busy: {e}"
                continue
            lots.append(Lottery(cfg, root, progress=progress, share=lots[0] if lots else None))
        for lot in lots:  # before any work: a damaged rewind file is refused, not rewritten
            lot.check_rewind_file()
        warn_few_evals(lots)  # before any training
        sinks: dict[str, WandbSink | None] = {}
        for lot in lots:
            sinks[lot.cfg.run_id] = sink = open_sink(lot)
            if sink is not None:
                stack_.callback(sink.close)
            lot.store.write_hparams(lot.hparams())
        inits = {lot.cfg.run_id: lot.init_weights() for lot in lots}
        for level in range(max((lot.cfg.prune.levels for lot in lots), default=-1) + 1):
            active = [lot for lot in lots if level <= lot.cfg.prune.levels and lot.needs(level)]
            if len(active) == 1:
                active[0].train_level(level, inits[active[0].cfg.run_id], sinks[active[0].cfg.run_id])
            elif active:
                train_level_together(level, active, inits, sinks)
            if after_level is not None:
                for lot in lots:
                    if level <= lot.cfg.prune.levels:
                        after_level(lot, level)
        for lot in lots:
            status[lot.cfg.run_id] = "trained"
    return status


def train_level_together(level: int, lots: list[Lottery], inits: dict, sinks: dict) -> None:
    plans = [lot.prepare_level(level, inits[lot.cfg.run_id], lot.missing(level)[0]) for lot in lots]
    for lot, plan in zip(lots, plans):  # a run that only adds small-dense members at this level
        if not plan.members:
            lot.finish_level(level, plan, None, [], 0.0, {}, sinks[lot.cfg.run_id])
    lots, plans = [lot for lot, p in zip(lots, plans) if p.members], [p for p in plans if p.members]
    if not plans:
        return
    members, weights, masks, index = [], [], [], []
    slot: dict[tuple[int, int], int] = {}  # dense level: (seed, copy) -> its one member
    for plan in plans:
        idx = []
        for m, w, mask in zip(plan.members, plan.weights, plan.masks):
            if level == 0 and (m.seed, m.copy) in slot:
                idx.append(slot[m.seed, m.copy])
                continue
            if level == 0:
                slot[m.seed, m.copy] = len(members)
            idx.append(len(members))
            members.append(m)
            weights.append(w)
            masks.append(mask)
        index.append(idx)
    lead = lots[0]
    together = LevelPlan(members, weights, masks, plans[0].can_prune, plans[0].start, plans[0].engine)
    state = lead.initial_state(level, together)
    # the dense level: each run's early-bird masks follow its own pruning rates
    birds = [lot.earlybird(members, idx, plan.can_prune) if level == 0 else None
             for lot, plan, idx in zip(lots, plans, index)]
    t0 = time.time()
    with lead.level_bar(level, together.engine.num_steps - together.start, f"({len(lots)} runs)",
                   start=together.start) as bar:
        result, _, _ = lead.run_plan(level, together, state, bar, [b for b in birds if b is not None])
    wall_s = time.time() - t0
    for lot, plan, idx, bird in zip(lots, plans, index, birds):
        files = {"earlybird.parquet": parquet_bytes(bird.table())} if bird is not None else {}
        lot.finish_level(level, plan, result.select(idx), plan.masks, wall_s, files, sinks[lot.cfg.run_id])

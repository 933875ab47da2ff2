"""Iterative magnitude pruning with rewinding, controls and a resumable store.

Level 0 trains the dense network of every seed (one population). Level L >= 1 prunes a fraction of
each ticket's remaining weights by magnitude (from level L-1's final weights), rewinds the survivors
and trains every arm x seed of the level as one population:

- ``ticket``: the IMP mask with the rewind-point weights (Frankle & Carbin 2019);
- ``reinit``: the same mask with a fresh init from another key;
- ``random_prune``: a random mask with the ticket's exact per-layer counts, rewind-point weights;
- ``shuffle``: the ticket's mask permuted within each layer, rewind-point weights.

Each level depends only on stored files, so a rerun resumes at the first incomplete level and ends
with results identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from .. import __version__
from ..config import ConfigError, ExperimentConfig, check_against_model
from ..data import load_dataset
from ..models import build_model, structure_of
from ..prune.baselines import match_width
from ..prune.criteria import Signals, magnitude_scores
from ..prune.criteria import scores as criterion_scores
from ..prune.masks import density, layer_table, prunable, prune_by_score, prune_to_density, sparsity_rows
from ..prune.schedules import agp_density, oneshot_config
from ..prune.signals import activation_sparsity
from ..prune.structured import check_granularity, structured_prune
from ..store import RunStore, load_tree, parquet_bytes, prepare_root, tree_bytes
from ..train import Engine, TrainResult, early_stop_steps, final_lr, init_population, init_variables, stack, unstack
from ..trees import kept_count, seed_keys, to_device, to_numpy
from ..wandb_log import WandbSink, flatten
from .arms import ARMS, ArmStart

@dataclass(frozen=True)
class Member:
    arm: str
    seed: int


def stored_init(store: RunStore, model, seeds, input_shape) -> dict:
    """The run's initial weights ``{'params', 'batch_stats'}`` stacked over ``seeds`` (key(seed) each),
    read from ``init.msgpack``; created and stored first if the run has none yet."""
    problem = store.file_problem("init.msgpack")
    if problem is not None:  # missing or damaged: the init is a function of the seeds, so recompute it
        if store.has("init.msgpack"):
            print(f"lth: {problem}; recomputing it from the seeds", file=sys.stderr)
        params, bs = init_population(model, seed_keys(seeds), input_shape)
        store.write_tree("init.msgpack", {"params": to_numpy(params), "batch_stats": to_numpy(bs)})
    return store.read_tree("init.msgpack")


@dataclass
class LevelPlan:
    members: list[Member]
    weights: list[dict]  # per member {'params', 'batch_stats'} it starts from (before masking)
    masks: list[Any]  # per member bool mask tree
    can_prune: Any  # per leaf: prunable
    start: int  # global step the level's training starts at
    engine: Engine


def population_key(cfg: ExperimentConfig) -> str | None:
    """Runs with equal keys can train each level together as one population; None: the run trains alone.

    Such runs share the data set, model, training and rewinding (so one compiled engine, one start
    step and one batch order per seed) and the number of levels; they may differ in seeds, arms and
    in how they prune (rate, scope, criterion, granularity, ...). AGP (``prune.schedule = 'gradual'``)
    updates masks during training and always trains alone.
    """
    if cfg.prune.schedule == "gradual":
        return None
    d = cfg.to_dict()
    for key in ("name", "seeds", "arms", "log", "quant"):
        d.pop(key, None)
    d["prune"] = {"levels": cfg.prune.levels}
    return json.dumps(d, sort_keys=True)


class Lottery:
    """Runs (and resumes) one IMP experiment into ``out/<run_id>``."""

    def __init__(self, cfg: ExperimentConfig, out: str | Path, *, progress: bool | None = None,
                 share: "Lottery | None" = None):
        """``share``: a Lottery of the same population group (:func:`population_key`) whose data set,
        model and compiled engines this one reuses."""
        self.cfg = cfg
        self.store = RunStore(prepare_root(out), cfg.run_id)
        self.progress = cfg.log.progress if progress is None else progress
        self._share = share
        if share is not None:
            if population_key(share.cfg) != population_key(cfg):
                raise ValueError(f"runs {share.cfg.run_id} and {cfg.run_id} cannot share a population")
            self.data, self.model, self.engine = share.data, share.model, share.engine
        else:
            self.data = load_dataset(cfg.data)
            try:
                self.model = build_model(cfg.model, self.data.num_classes, self.data.input_shape)
                self.engine = Engine(self.model, self.data, cfg.train)
            except ValueError as e:  # model/data mismatch, batch larger than the data set
                raise ConfigError(f"{cfg.model.name} on {cfg.data.name}: {e}") from None
        self._finetune_engine: Engine | None = None
        pc = cfg.prune
        if pc.schedule in ("oneshot", "gradual") and pc.levels > 1:
            raise ConfigError(f"prune.schedule = {pc.schedule!r} prunes in one level: set prune.levels = 1 "
                              f"(got {pc.levels})")
        if pc.schedule == "gradual":
            end = pc.agp_start_step + pc.agp_updates * pc.agp_frequency
            if end > self.engine.num_steps:
                raise ConfigError(f"prune.agp_start_step + agp_updates * agp_frequency = {end} is past the "
                                  f"end of training ({self.engine.num_steps} steps)")
            if set(cfg.arms) - {"ticket"}:
                raise ConfigError("prune.schedule = 'gradual' trains no controls: set arms = ['ticket']")
        shapes = jax.eval_shape(lambda k: init_variables(self.model, k, self.data.input_shape)[0], jax.random.key(0))
        self.structure = structure_of(self.model)  # what the model declares: output, frozen, chain, blocks
        check_against_model(cfg, layer_table(shapes, self.structure), self.engine.num_steps)  # before any level trains
        check_granularity(cfg.prune, self.model, shapes, cfg.model.name)
        self.trained_levels: list[int] = []  # levels trained by this process (not resumed)

    # ------------------------------------------------------------------ fixed weights
    def hparams(self) -> dict:
        """The run's identity file: every setting but the quant stage's (keyed apart, per cell)."""
        d = self.cfg.to_dict()
        d.pop("quant", None)
        return {**d, "run_id": self.cfg.run_id, "lth_version": __version__,
                "num_steps": self.engine.num_steps, "data_fingerprint": self.data.fingerprint}

    def init_weights(self) -> dict:
        """{'params', 'batch_stats'} stacked over seeds; created once and stored."""
        return stored_init(self.store, self.model, self.cfg.seeds, self.data.input_shape)

    # ------------------------------------------------------------------ levels
    def members(self, level: int) -> list[Member]:
        """The members of a level's main population (small-dense baselines train separately)."""
        if level == 0:
            return [Member("ticket", s) for s in self.cfg.seeds]
        return [Member(a, s) for a in self.cfg.arms if a != "small_dense" for s in self.cfg.seeds]

    def run(self, log: WandbSink | None = None, after_level: Callable[[int], None] | None = None) -> RunStore:
        """Train every incomplete level, holding the run's lock (RunBusyError if another process has it).

        ``after_level(level)`` is called once each level is complete (trained now or before), in
        level order, still under the lock: the later stages of the pipeline (quantization) hook in here.
        """
        cfg, store = self.cfg, self.store
        with store.lock():
            store.write_hparams(self.hparams())
            init = self.init_weights()
            for level in range(cfg.prune.levels + 1):
                if not store.is_complete(level):
                    self.train_level(level, init, log)
                if after_level is not None:
                    after_level(level)
        return store

    def _rewind_point(self, init: dict) -> dict:
        if self.cfg.rewind.step == 0:
            return init
        return self.store.read_tree("rewind.msgpack")

    def prepare_level(self, level: int, init: dict) -> "LevelPlan":
        """Members, their starting weights and masks, the start step and the engine of a level.

        Level L >= 1 prunes each seed's ticket from level L-1's stored final weights and mask.
        """
        cfg, store = self.cfg, self.store
        members = self.members(level)
        seeds = list(cfg.seeds)
        can_prune = prunable(unstack(init["params"], 0), cfg.prune, self.structure)
        if level == 0:
            weights = [unstack(init, i) for i in range(len(seeds))]
            masks = [jax.tree.map(lambda p: np.ones(p.shape, bool), w["params"]) for w in weights]
            return LevelPlan(members, weights, masks, can_prune, 0, self.engine)
        if cfg.prune.schedule == "gradual":  # AGP: train from init, masks follow the schedule
            weights = [unstack(init, i) for i in range(len(seeds))]
            masks = [jax.tree.map(lambda p: np.ones(p.shape, bool), w["params"]) for w in weights]
            return LevelPlan(members, weights, masks, can_prune, 0, self.engine)
        prev = store.level_dir(level - 1)
        prev_masks = load_tree(prev / "masks.msgpack")
        prev_final = load_tree(prev / "final.msgpack")
        prune_cfg = oneshot_config(cfg.prune) if cfg.prune.schedule == "oneshot" else cfg.prune
        # the ticket members of the previous level are its first len(seeds) members
        tickets = []
        for i, seed in enumerate(seeds):
            member = {"params": unstack(prev_final["params"], i), "batch_stats": unstack(prev_final["batch_stats"], i)}
            if prune_cfg.granularity != "weight":
                tickets.append(structured_prune(member["params"], unstack(prev_masks, i), prune_cfg, self.model))
                continue
            scores = self.scores(member, seed, level)
            tickets.append(prune_by_score(scores, unstack(prev_masks, i), member["params"], prune_cfg, self.structure))
        if cfg.rewind.mode == "weights":
            rewind = self._rewind_point(init)
            start_weights = [unstack(rewind, i) for i in range(len(seeds))]
        else:  # lr rewinding and fine-tuning keep the trained weights
            start_weights = [unstack(prev_final, i) for i in range(len(seeds))]
        engine = self._finetune() if cfg.rewind.mode == "finetune" else self.engine
        weights, masks = [], []
        for m in members:
            i = seeds.index(m.seed)
            ticket = ArmStart(start_weights[i], tickets[i], can_prune, m.seed, level, self.model,
                              self.data.input_shape)
            w, mask = ARMS[m.arm](ticket)
            weights.append(w)
            masks.append(mask)
        return LevelPlan(members, weights, masks, can_prune, cfg.rewind.step, engine)

    def scores(self, member: dict, seed: int, level: int):
        """Per-weight scores of ``prune.criterion`` for one trained member (higher = keep)."""
        pc = self.cfg.prune

        def batches():  # the seed's first criterion_batches training batches
            idx = self.engine.order.indices(seed, 0, pc.criterion_batches)
            return [(self.data.x_train[i], self.data.y_train[i]) for i in idx]

        signals = Signals(self.model, member["params"], member["batch_stats"], seed, level, pc, batches)
        return criterion_scores(member["params"], signals)

    def initial_state(self, level: int, plan: "LevelPlan"):
        """The population TrainState a level starts from (masked weights, fresh optimizer)."""
        params = stack([w["params"] for w in plan.weights])  # numpy: the engine places it on its devices
        bs = stack([w["batch_stats"] for w in plan.weights])
        rngs = seed_keys([m.seed for m in plan.members], fold=level)
        return plan.engine.init(params, bs, stack(plan.masks), rngs, start=plan.start)

    def train_level(self, level: int, init: dict, log: WandbSink | None) -> None:
        """Prepare, train and store one level of this run alone (see :func:`run_group` for several)."""
        plan = self.prepare_level(level, init)
        state = self.initial_state(level, plan)
        t0 = time.time()
        with self.level_bar(level, plan.engine.num_steps - plan.start) as bar:
            result, masks, files = self.run_plan(level, plan, state, bar)
        self.finish_level(level, plan, result, masks, time.time() - t0, files, log)

    def snapshot_steps(self, level: int) -> tuple[int, ...]:
        """Steps whose weights a level keeps: the rewind point k > 0 of the dense level."""
        return (self.cfg.rewind.step,) if level == 0 and self.cfg.rewind.step > 0 else ()

    def run_plan(self, level: int, plan: "LevelPlan", state, bar):
        """Train a prepared level: (TrainResult, final masks per member, extra level files)."""
        if level > 0 and self.cfg.prune.schedule == "gradual":
            result, masks, agp = self._run_gradual(state, plan.members, plan.can_prune, bar)
            return result, masks, {"agp.parquet": parquet_bytes(agp)}
        result = plan.engine.run(state, [m.seed for m in plan.members], start=plan.start,
                                 snapshot_steps=self.snapshot_steps(level), progress=bar)
        return result, plan.masks, {}

    def finish_level(self, level: int, plan: "LevelPlan", result, masks, wall_s: float, files: dict,
                     log: WandbSink | None) -> None:
        """Evaluate, assemble and atomically store a trained level (its members only)."""
        cfg, store = self.cfg, self.store
        members, can_prune, engine = plan.members, plan.can_prune, plan.engine
        files = dict(files)
        densities = [density(mk, can_prune) for mk in masks]
        if self.snapshot_steps(level):
            store.write_tree("rewind.msgpack", to_numpy(result.snapshots[cfg.rewind.step]))
        final = {"params": to_numpy(result.state.params), "batch_stats": to_numpy(result.state.batch_stats)}
        metrics = self._metrics_table(level, members, densities, result.records, wall_s, result.diverged)
        metrics["param_count"] = [kept_count(masks[k]) for k in metrics["member"]]
        act = self._activation_sparsity(result.state, members)
        if act is not None:
            files["activations.parquet"] = parquet_bytes(act)
        if level > 0 and "small_dense" in cfg.arms:
            small_metrics, small_final = self._train_small_dense(level, metrics, masks)
            metrics = pd.concat([metrics, small_metrics], ignore_index=True)
            files["small_dense_final.msgpack"] = tree_bytes(small_final)
        sparsity = self._sparsity_table(level, members, final["params"], masks, can_prune)
        store.write_level(level, {**files,
            "members.json": json.dumps([{"arm": m.arm, "seed": m.seed} for m in members]).encode(),
            "masks.msgpack": tree_bytes(to_numpy(stack(masks))),
            "final.msgpack": tree_bytes(final),
            "metrics.parquet": parquet_bytes(metrics),
            "sparsity.parquet": parquet_bytes(sparsity),
        })
        self.trained_levels.append(level)
        if log is not None:
            log.log_level(level, engine.num_steps, metrics.to_dict("records"))

    def _run_gradual(self, state, members, can_prune, bar):
        """AGP: one training run; at t0, t0 + dt, ..., t0 + n dt every member's layers are pruned by
        magnitude to the schedule's density. Returns (result, final masks, schedule table)."""
        pc, engine = self.cfg.prune, self.engine
        updates = [pc.agp_start_step + j * pc.agp_frequency for j in range(pc.agp_updates + 1)]
        seeds = [m.seed for m in members]
        records, diverged, rows, pos = [], {}, [], 0
        for u in sorted(set(updates) | {engine.num_steps}):
            if u > pos:
                res = engine.run(state, seeds, start=pos, stop=u, progress=bar)
                state, pos = res.state, u
                records += res.records
                for k, v in res.diverged.items():
                    diverged.setdefault(k, v)
            if u == engine.num_steps and u not in updates:
                break
            target = agp_density(u, pc)
            params = to_numpy(state.params)
            masks = [prune_to_density(magnitude_scores(unstack(params, k)), unstack(to_numpy(state.mask), k),
                                      can_prune, target) for k in range(len(members))]
            mask_pop = to_device(stack(masks))
            state = engine.remask(state, mask_pop)
            rows.append({"step": u, "target_density": target, "density": density(masks[0], can_prune)})
        final_masks = [unstack(to_numpy(state.mask), k) for k in range(len(members))]
        return TrainResult(state=state, records=records, diverged=diverged), final_masks, pd.DataFrame(rows)

    def _activation_sparsity(self, state, members) -> pd.DataFrame | None:
        """Fraction of exact-zero ReLU outputs per hidden layer on the test split, per member."""
        rows = []
        x = self.data.x_test[:2000]
        host = to_numpy((state.params, state.batch_stats))  # slicing on the host compiles nothing
        for k, m in enumerate(members):
            member = jax.tree.map(lambda a: a[k], host)
            for layer, frac in activation_sparsity(self.model, member[0], member[1], x).items():
                rows.append({"arm": m.arm, "seed": m.seed, "member": k, "layer": layer, "zero_fraction": frac})
        return pd.DataFrame(rows) if rows else None

    def _train_small_dense(self, level: int, ticket_metrics: pd.DataFrame, masks) -> tuple[pd.DataFrame, dict]:
        """Train, for every seed, a dense model whose parameter count matches the seed's ticket."""
        cfg = self.cfg
        seeds = list(cfg.seeds)
        target = kept_count(masks[0])  # the ticket of seeds[0]; layerwise counts are equal for every seed
        width, count = match_width(cfg.model, self.data.num_classes, self.data.input_shape, target)
        if abs(count - target) > 0.02 * target:
            warnings.warn(f"level {level}: the closest small-dense model has {count} parameters, "
                          f"{100 * (count / target - 1):+.1f}% off the ticket's {target}", RuntimeWarning)
        model = build_model(dataclasses.replace(cfg.model, width=width), self.data.num_classes,
                            self.data.input_shape)
        engine = Engine(model, self.data, cfg.train)
        keys = seed_keys(seeds)
        params, bs = init_population(model, keys, self.data.input_shape)
        state = engine.init(params, bs, jax.tree.map(lambda p: jnp.ones(p.shape, bool), params), keys)
        t0 = time.time()
        with self.level_bar(level, engine.num_steps, "small-dense") as bar:
            result = engine.run(state, seeds, progress=bar)
        members = [Member("small_dense", s) for s in seeds]
        ticket_density = float(ticket_metrics.loc[ticket_metrics["arm"] == "ticket", "density"].iloc[0])
        df = self._metrics_table(level, members, [ticket_density] * len(seeds), result.records,
                                 time.time() - t0, result.diverged)
        df["member"] += int(ticket_metrics["member"].max()) + 1
        df["param_count"] = count
        df["width"] = width
        return df, {"params": to_numpy(result.state.params), "batch_stats": to_numpy(result.state.batch_stats)}

    def _finetune(self) -> Engine:
        if self._share is not None:  # same train and rewind config: the same compiled programs
            return self._share._finetune()
        if self._finetune_engine is None:
            lr = self.cfg.rewind.finetune_lr or final_lr(self.cfg.train, self.engine.num_steps)
            self._finetune_engine = Engine(self.model, self.data, self.cfg.train, lr_fn=optax.constant_schedule(lr))
        return self._finetune_engine

    def _metrics_table(self, level, members, densities, records, wall_s, diverged) -> pd.DataFrame:
        return metrics_table(self.cfg.run_id, level, members, densities, records, wall_s, diverged)

    def _sparsity_table(self, level, members, final_params, masks, can_prune) -> pd.DataFrame:
        return sparsity_table(level, members, final_params, masks, can_prune)

    def level_bar(self, level: int, total: int, what: str = "", start: int | None = None):
        """Progress of one level's ``total`` steps; level L > 0 starts at the rewind step unless ``start``."""
        if start is None:
            start = 0 if level == 0 or what else self.cfg.rewind.step
        desc = f"level {level}/{self.cfg.prune.levels}{' ' + what if what else ''}"
        return progress_bar(self.progress, desc, total, start)


def metrics_table(run_id: str, level: int, members, densities, records, wall_s: float, diverged) -> pd.DataFrame:
    """Tidy metrics of a trained population: one row per (member, step, split)."""
    df = pd.DataFrame.from_records(records)
    es = early_stop_steps(records)
    df["run_id"] = run_id
    df["level"] = level
    df["arm"] = [members[k].arm for k in df["member"]]
    df["seed"] = [members[k].seed for k in df["member"]]
    df["density"] = [densities[k] for k in df["member"]]
    df["early_stop_step"] = [es.get(k, -1) for k in df["member"]]
    df["diverged_step"] = [diverged.get(k, -1) for k in df["member"]]
    df["wall_s"] = wall_s
    cols = ["run_id", "level", "arm", "seed", "member", "density", "step", "split", "loss", "accuracy",
            "early_stop_step", "diverged_step", "wall_s"]
    return df[cols]


def sparsity_table(level: int, members, final_params, masks, can_prune) -> pd.DataFrame:
    """Per member and layer: shape, count, non-zeros and density of the trained weights."""
    rows = []
    for k, m in enumerate(members):
        for r in sparsity_rows(unstack(final_params, k), masks[k], can_prune):
            rows.append({"level": level, "arm": m.arm, "seed": m.seed, "member": k, **r})
    return pd.DataFrame.from_records(rows)


@contextlib.contextmanager
def progress_bar(enabled: bool, desc: str, total: int, start: int = 0):
    """A tqdm bar over ``total`` training steps from global step ``start``; yields the engine's
    ``progress(step, metrics)`` callback (None when disabled)."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=True, dynamic_ncols=True)
    last = [start]

    def update(step: int, metrics: dict) -> None:
        bar.update(step - last[0])
        last[0] = step
        post = {"loss": f"{metrics['train'][0]:.3f}"}
        if "val" in metrics:
            post["val_acc"] = f"{metrics['val'][1]:.3f}"
        post["test_acc"] = f"{metrics['test'][1]:.3f}"
        bar.set_postfix(post)

    try:
        yield update
    finally:
        bar.close()


def run_lottery(cfg: ExperimentConfig, out: str | Path, *, progress: bool | None = None) -> RunStore:
    """Run or resume the IMP experiment ``cfg`` into ``out``; returns its store.

    A finished run returns at once, without loading data or compiling anything.
    """
    store = RunStore(prepare_root(out), cfg.run_id)
    if store.is_finished(cfg.prune.levels):
        return store
    lottery = Lottery(cfg, out, progress=progress)
    sink = open_sink(lottery)
    try:
        return lottery.run(sink)
    finally:
        if sink is not None:
            sink.close()


def open_sink(lottery: Lottery) -> WandbSink | None:
    cfg = lottery.cfg
    if cfg.log.wandb == "disabled":
        return None
    return WandbSink(cfg.log.wandb, cfg.log.project, cfg.name, cfg.run_id, flatten(cfg.to_dict()),
                     lottery.store.path / "wandb")
